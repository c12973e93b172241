"""llm_distill: distil large chat models into small ones (generate -> train -> evaluate)."""

__version__ = "0.1.0"
