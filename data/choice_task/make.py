# Rebuild the second bundled task (questions with several right answers) and its tiny teacher (CPU, ~3 minutes):
#     python data/choice_task/make.py
# Writes data/choice_task/train.jsonl (prompts), heldout.jsonl (prompts with `references`, every right answer) and
# teacher/ (a ~1 M parameter Llama trained with `llm-distill train`, CE only, on freshly drawn questions each
# labelled with one right answer drawn uniformly, so it learns a distribution over the right answers).
import sys
import tempfile
from pathlib import Path

from llm_distill.tiny_task import build_task, train_teacher

here = Path(__file__).resolve().parent
build_task(here, family="choice")
if "--prompts-only" not in sys.argv:
    with tempfile.TemporaryDirectory() as work:
        print("teacher ->", train_teacher(here, work, family="choice"))
