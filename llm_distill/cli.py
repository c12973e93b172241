"""Command line: `llm-distill {generate,score,merge,ensemble,train,evaluate,export,quickstart} [recipe.yaml] [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError

STAGES = ("generate", "score", "merge", "ensemble", "train", "evaluate", "export", "quickstart")


def _quiet_libraries() -> None:
    """Our own progress bars and one-line summaries only: no per-file load/save bars from the libraries."""
    import datasets
    import transformers

    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()  # no per-retry HTTP warnings: our error says what failed
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # A file datasets cannot read is logged by it and then raised: the raise becomes our one-line error.
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error, instead of usage + message
        print(f"llm-distill: error: {message} (see llm-distill --help)", file=sys.stderr)
        sys.exit(2)


def _end_progress_bars() -> None:
    """Close progress bars a refused run left open, so that the error starts on a line of its own."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def error_line(stage: str, message: str) -> str:
    """The one way an error reaches the user: one line on stderr (the caller exits with code 2)."""
    return f"llm-distill {stage}: error: " + " ".join(str(message).split())


def _is_process_entry() -> bool:
    """True when this process runs the CLI itself (`llm-distill ...` or `python -m llm_distill`), not a caller
    that imported `main` (tests, notebooks): only then may a stage end the process."""
    entry = sys.modules.get("__main__")
    spec = getattr(entry, "__spec__", None)
    return (spec is not None and spec.name in ("llm_distill.__main__", "llm_distill.cli")) or \
        os.path.basename(sys.argv[0] or "") == "llm-distill"


def _leave_now(*, run_exit_handlers: bool) -> None:
    """End the process with status 0 now, skipping interpreter teardown (see the callers for why)."""
    if run_exit_handlers:
        import atexit

        atexit._run_exitfuncs()  # engine shutdown, logging, trackers: what a normal exit runs before teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="llm-distill",
        description="Distil a large chat model into a small one: generate -> train -> evaluate.",
        epilog="Example: llm-distill train recipes/tiny/train_kd.yaml max_steps=200 output_dir=runs/kd")
    parser.add_argument("stage", choices=STAGES, help="which stage to run")
    parser.add_argument("args", nargs="*", help="an optional recipe YAML, then key=value overrides")
    ns = parser.parse_args(argv)
    recipe = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    overrides = ns.args[1:] if recipe else ns.args
    _quiet_libraries()
    try:
        from .config import EvaluateConfig, ExportConfig, GenerateConfig, QuickstartConfig, TrainConfig, load_config

        if ns.stage == "generate":
            from . import generate

            generate.main(load_config(GenerateConfig, recipe, overrides))
        elif ns.stage == "score":
            from . import score
            from .config import ScoreConfig

            score.main(load_config(ScoreConfig, recipe, overrides))
        elif ns.stage == "merge":
            from . import merge
            from .config import MergeConfig

            merge.main(load_config(MergeConfig, recipe, overrides))
        elif ns.stage == "ensemble":
            from . import ensemble
            from .config import EnsembleConfig

            ensemble.main(load_config(EnsembleConfig, recipe, overrides))
        elif ns.stage == "train":
            from . import train

            train.main(load_config(TrainConfig, recipe, overrides))
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Every rank has passed the final barrier, the student is saved and every file is closed. The
                # process group is left up (train.fit says why); once, a rank of a finished run then aborted at
                # interpreter exit ("terminate called without an active exception", exit -6: a C++ thread still
                # joinable when destructors run; which library's was not traced). Leave without running them.
                _leave_now(run_exit_handlers=False)
        elif ns.stage == "evaluate":
            from . import evaluate

            evaluate.main(load_config(EvaluateConfig, recipe, overrides))
        elif ns.stage == "export":
            from . import export

            export.main(load_config(ExportConfig, recipe, overrides))
        else:
            from . import quickstart

            quickstart.main(load_config(QuickstartConfig, recipe, overrides))
        engines = sys.modules.get("llm_distill.vllm_backend")
        if engines is not None and engines.ENGINES_STARTED and _is_process_entry():
            # The stage is done; VLLMBackend.close shuts its engines down (explicitly, or in the exit handlers run
            # below). Even so, a process that had run vLLM's CPU engine aborted at times in interpreter teardown
            # ("terminate called without an active exception", exit -6; seen in `score` and in on-policy `train`,
            # rarely; which library's thread was not traced). Run the exit handlers, then leave without teardown.
            _leave_now(run_exit_handlers=True)
    except UserError as e:
        _end_progress_bars()
        print(error_line(ns.stage, str(e)), file=sys.stderr)
        return 2
    except OSError as e:  # a file-system fault (permissions, a full disk, a vanished file): the path and the cause
        where = f"{e.filename}: " if e.filename else ""
        print(error_line(ns.stage, f"{where}{e.strerror or e}; check that path (permissions, free space)"),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-distill {ns.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
