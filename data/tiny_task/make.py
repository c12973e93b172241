# Rebuild the bundled task and its tiny teacher (CPU, about 3 minutes):
#     python data/tiny_task/make.py
# Writes data/tiny_task/train.jsonl, heldout.jsonl (prompts with exact references) and teacher/ (a ~1 M parameter
# Llama trained with `llm-distill train`, CE only, on its own freshly drawn labelled questions).
import sys
import tempfile
from pathlib import Path

from llm_distill.tiny_task import build_task, train_teacher

here = Path(__file__).resolve().parent
build_task(here)
if "--prompts-only" not in sys.argv:
    with tempfile.TemporaryDirectory() as work:
        print("teacher ->", train_teacher(here, work))
