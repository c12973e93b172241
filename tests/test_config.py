from pathlib import Path

import pytest

from llm_distill.config import EvaluateConfig, GenerateConfig, QuickstartConfig, TrainConfig, load_config
from llm_distill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"generate": GenerateConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "quickstart": QuickstartConfig}


def recipe_files():
    return sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_parses(path):
    kind = next(k for k in KINDS if path.stem.startswith(k))
    cfg = load_config(KINDS[kind], str(path))
    assert cfg.output_dir
    assert path.read_text().startswith("#"), "every recipe opens with a comment giving the command"


ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_parses(path):
    """accelerate's own loader reads each launch config (it rejects unknown keys); the header gives the command."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.mixed_precision == "bf16"
    assert f"accelerate launch --config_file recipes/accelerate/{path.name} -m llm_distill train" in path.read_text()
    kinds = {c.distributed_type.value for c in map(load_config_from_file, map(str, ACCELERATE_CONFIGS))}
    assert kinds == {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    if cfg.distributed_type.value == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if cfg.distributed_type.value == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] in (2, 3) and cfg.deepspeed_config["gradient_accumulation_steps"] == 1


def test_there_are_recipes():
    assert len(recipe_files()) >= 4


def test_overrides_nested_and_typed():
    cfg = load_config(TrainConfig, str(ROOT / "recipes/tiny/train_kd.yaml"),
                      ["student_config.hidden_size=32", "learning_rate=1e-4", "max_steps=7", "overwrite=true"])
    assert cfg.student_config["hidden_size"] == 32 and cfg.student_config["num_hidden_layers"] == 2
    assert cfg.learning_rate == pytest.approx(1e-4) and cfg.max_steps == 7 and cfg.overwrite is True


def test_unknown_key_is_named():
    with pytest.raises(UserError, match="unknown key 'max_stepz'"):
        load_config(TrainConfig, str(ROOT / "recipes/tiny/train_kd.yaml"), ["max_stepz=3"])


def test_wrong_type_and_invalid_value():
    with pytest.raises(UserError, match="'max_steps' must be int"):
        load_config(TrainConfig, str(ROOT / "recipes/tiny/train_kd.yaml"), ["max_steps=many"])
    with pytest.raises(UserError, match="top_p"):
        load_config(GenerateConfig, str(ROOT / "recipes/tiny/generate.yaml"), ["top_p=0"])
    with pytest.raises(UserError, match="not key=value"):
        load_config(GenerateConfig, None, ["model"])


def test_every_field_has_a_docstring():
    import ast
    import inspect

    from llm_distill import config

    tree = ast.parse(inspect.getsource(config))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                        f"{node.name}.{stmt.target.id} has no docstring"
