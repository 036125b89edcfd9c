"""Config loading: YAML + dot-list overrides, type coercion, errors that name the key.

python -m pytest -q tests/unit/test_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from train.config import Config, config_to_dict, load_config, parse_overrides, save_config
from train.metrics import resolve_wandb_mode

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def _error(overrides, path=None) -> str:
    with pytest.raises(ValueError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_and_demo_recipe_load():
    assert isinstance(load_config(None), Config)
    cfg = load_config(DEMO)
    assert cfg.attention.causal
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (4, 128, 4)
    assert (cfg.train.seq_len, cfg.attention.block_size, cfg.model.vocab_size) == (2048, 64, 4096)
    assert (cfg.attention.window_blocks, cfg.attention.global_blocks) == (3, 1)
    assert cfg.attention.random_blocks == 2
    assert cfg.train.run_dir == "runs/demo"


def test_overrides_are_coerced_to_the_field_types():
    cfg = load_config(
        DEMO,
        [
            "train.steps=50",
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string
            "optim.weight_decay=0",  # int for a float field
            "attention.window_blocks=5",
            "attention.causal=true",
            "attention.dilation=[1,2,1,1]",
            "optim.betas=0.8,0.99",
            "logging.run_name=123",  # stays a string
            "logging.group=null",
            "schedule.decay_steps=40",
            "model.ffn_hidden=null",
            "model.tie_embeddings=false",
        ],
    )
    assert cfg.train.steps == 50 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    assert cfg.attention.window_blocks == 5
    assert cfg.attention.dilation == (1, 2, 1, 1)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.logging.run_name == "123"
    assert cfg.logging.group is None
    assert cfg.schedule.decay_steps == 40
    assert cfg.model.ffn_hidden is None and cfg.model.tie_embeddings is False


def test_override_wins_over_yaml_and_keeps_the_rest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 7\n  seed: 3\nattention:\n  window_blocks: 5\n")
    cfg = load_config(recipe, ["train.steps=9"])
    assert (cfg.train.steps, cfg.train.seed) == (9, 3)
    # A partly given section keeps the root's defaults for the rest (the LM is causal).
    assert cfg.attention.causal and cfg.attention.window_blocks == 5


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "train.stepz=5",
            ["train.stepz", "valid keys of train", "steps", "did you mean 'train.steps'"],
        ),
        ("attention.windw_blocks=5", ["attention.windw_blocks", "'attention.window_blocks'"]),
        ("trainn.steps=5", ["trainn", "did you mean 'train'"]),
    ],
)
def test_unknown_key_names_it_and_the_valid_keys(override, expected):
    message = _error([override])
    for part in expected:
        assert part in message, message


def test_unknown_key_in_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  learning_rate: 0.1\n")
    message = _error([], recipe)
    assert "optim.learning_rate" in message and "lr" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("attention.causal=maybe", "attention.causal"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.lr=fast", "optim.lr"),
        ("model.vocab_size=[1,2]", "model.vocab_size"),
    ],
)
def test_bad_value_type_names_the_key(override, key):
    assert key in _error([override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=0", "train.steps"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
        ("optim.grad_clip=inf", "optim.grad_clip"),
        ("schedule.min_lr=inf", "schedule.min_lr"),
        ("attention.window_blocks=0", "attention.window_blocks"),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
        ("logging.wandb_mode=loud", "logging.wandb_mode"),
        ("parallel.tp=0", "parallel.tp"),
        ("model.mlp=relu", "model.mlp"),
        ("model.arch=mamba", "model.arch"),
    ],
)
def test_invalid_value_names_the_key(override, key):
    assert key in _error([override])


@pytest.mark.parametrize("override", ["train.steps", "steps=5", "=5", "train..steps=5"])
def test_bad_override_syntax(override):
    message = _error([override])
    assert repr(override) in message and "section.key=value" in message


def test_override_inside_a_value_or_a_whole_section():
    assert "train.steps" in _error(["train.steps.x=1"])
    assert "model" in _error(["model=3"])


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (
            ["train.seq_len=1000", "parallel.cp=2"],
            ["train.seq_len=1000", "attention.block_size=64", "parallel.cp=2"],
        ),
        (["model.n_heads=3"], ["model.n_heads=3", "model.d_model=128"]),
        (["attention.causal=false"], ["attention.causal", "data.objective=mlm"]),
        (["data.objective=mlm"], ["data.objective=mlm", "attention.causal=false"]),
        (
            [
                "attention.causal=false",
                "data.objective=mlm",
                "attention.etc_tokens=2",
                "parallel.tp=2",
                "parallel.sequence_parallel=true",
            ],
            ["attention.etc_tokens=2", "parallel.sequence_parallel"],
        ),
        (["schedule.min_lr=1.0", "optim.lr=0.1"], ["schedule.min_lr", "optim.lr"]),
        (["parallel.cp=3"], ["parallel.cp=3", "train.seq_len"]),
        (["attention.dilation=[1,2]"], ["attention.dilation"]),
    ],
)
def test_impossible_combinations_name_both_keys(overrides, keys):
    message = _error(overrides, DEMO)
    for key in keys:
        assert key in message, message


def test_a_bidirectional_mlm_encoder_with_global_tokens_loads():
    cfg = load_config(
        DEMO,
        [
            "attention.causal=false",
            "data.objective=mlm",
            "attention.global_tokens=[0,100]",
            "data.global_doc_starts=true",
        ],
    )
    assert not cfg.attention.causal and cfg.attention.global_tokens == (0, 100)
    assert cfg.data.objective == "mlm" and cfg.data.global_doc_starts


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["attention.dilation=[1,2,1,1]", "optim.lr=2e-3", "train.steps=3"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg) == yaml.safe_load(path.read_text())


def test_parse_overrides_builds_nested_raw_values():
    tree = parse_overrides(["a.b=1", "a.c=x=y"])
    assert tree == {"a": {"b": "1", "c": "x=y"}}


def test_wandb_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model:\n\tvocab_size: 512\n", ["line 2, column 1", "spaces, not tabs"]),
        ("model: [1, 2\n", ["line 2", "expected ','"]),
        ("model:\n  vocab_size: 512\n   d_model: 64\n", ["line 3", "mapping values"]),
        (
            "attention:\n  random_blocks: 2\n  random_pool_blocks: 8\n  random_blocks: 3\n",
            ["line 4", "'random_blocks' is given twice", "first at line 2"],
        ),
    ],
)
def test_malformed_yaml_is_one_sentence_naming_file_and_line(tmp_path, text, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    for part in expected:
        assert part in message, message


def test_train_cli_refuses_malformed_yaml_without_a_traceback(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n\tvocab_size: 512\n")
    run = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"error: {path}, line 2, column 1:" in run.stderr, run.stderr
