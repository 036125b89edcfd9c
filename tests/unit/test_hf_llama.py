"""HF Llama <-> halotron (train/hf.py, train/hf_llama.py), with transformers' own forward as
the oracle: a tiny random LlamaForCausalLM is imported into a run at step 0, the run's model
gives HF's logits; the run exported back loads with from_pretrained and gives the same logits,
its tensors are the original ones and its tokenizer gives the sentencepiece ids; what cannot be
converted exactly is refused; `python -m train --resume` continues the imported run.

    python -m pytest -q tests/unit/test_hf_llama.py
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data.tokenizer import Tokenizer  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from tests.hf_cases import (  # noqa: E402
    RUN,
    SEQ,
    VOCAB,
    hf_load,
    hf_tensors,
    import_run,
    logit_diff,
    run_model,
    save_random,
    tokens,
)
from train.checkpoint import CheckpointArgs, CheckpointManager  # noqa: E402
from train.config import load_config  # noqa: E402
from train.hf import import_config, main, uncovered_layers  # noqa: E402
from train.hf_common import TOKENIZER_CHECK_TEXT  # noqa: E402
from train.hf_llama import LlamaConverter  # noqa: E402

LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=SEQ,
    rope_theta=5e5,  # not halotron's default: the converter must carry it
    rms_norm_eps=1e-6,  # likewise
    initializer_range=0.1,  # logits up to ~4: without the RoPE row permutation they differ by 3
)
LLAMA_RUN = [*RUN, "attention.block_size=32"]
CAUSAL_LM = transformers.AutoModelForCausalLM


def make_llama(out: Path, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM saved in `out` (norm gains random too)."""
    return save_random(CAUSAL_LM, transformers.LlamaConfig(**{**LLAMA, **overrides}), out, seed)


def import_llama(hf_dir: Path, run_dir: Path, data: Path, *extra: str) -> int:
    return import_run(hf_dir, run_dir, data, *LLAMA_RUN, *extra)


def max_logit_diff(model: Transformer, hf_model) -> float:
    ids = tokens()
    with torch.no_grad():
        return logit_diff(model(ids), hf_model.eval()(ids).logits)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("hf_llama"))


@pytest.fixture(scope="module")
def run_dir(hf_dir, tiny_prepared_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("imported") / "run"
    assert import_llama(hf_dir, run, tiny_prepared_data) == 0
    return run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "hf"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    return out


def test_import_writes_a_step_0_run_with_hf_logits(hf_dir, run_dir):
    state = CheckpointManager(CheckpointArgs(), run_dir).load_latest()
    assert state is not None and state["progress"]["step"] == 0
    assert {"engine", "data", "rng", "progress"} <= set(state)
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.train.run_dir == str(run_dir) and cfg.model.norm_eps == 1e-6
    assert cfg.model.rope_theta == 5e5 and not cfg.model.tie_embeddings
    assert uncovered_layers(cfg) == []  # full causal attention
    hf_model = hf_load(CAUSAL_LM, hf_dir)
    err = max_logit_diff(run_model(run_dir), hf_model)
    print(f"import: max |logit difference| {err:.2e}")
    assert err < 1e-4, err


def test_export_loads_with_from_pretrained_and_gives_the_runs_logits(run_dir, exported):
    hf_model = hf_load(CAUSAL_LM, exported)
    err = max_logit_diff(run_model(run_dir), hf_model)
    print(f"export: max |logit difference| {err:.2e}")
    assert err < 1e-4, err


def test_round_trip_gives_identical_tensors(hf_dir, exported):
    want, got = hf_tensors(hf_dir), hf_tensors(exported)
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    config = json.loads((exported / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps"):
        assert config[key] == LLAMA[key], key


def test_tied_embeddings_round_trip(tmp_path):
    hf_dir = make_llama(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    converter = LlamaConverter()
    model, attention, state = converter.from_hf(hf_dir)
    assert model["tie_embeddings"] and state["lm_head.weight"] is state["embed.weight"]
    cfg = import_config(None, LLAMA_RUN, {"model": model, "attention": attention}, tmp_path / "run")
    ours = Transformer(cfg.model, cfg.attention)
    ours.load_state_dict(state)
    converter.to_hf(cfg, state, tmp_path / "out")
    hf_model = hf_load(CAUSAL_LM, tmp_path / "out")
    assert hf_model.config.tie_word_embeddings
    want, got = hf_tensors(hf_dir), hf_tensors(tmp_path / "out")
    assert want.keys() == got.keys() and "lm_head.weight" not in got
    assert all(torch.equal(got[k], t) for k, t in want.items())
    assert max_logit_diff(ours.eval(), hf_model) < 1e-4


def test_the_exported_tokenizer_gives_the_sentencepiece_ids(exported, tiny_prepared_data):
    sp = Tokenizer.load(Path(tiny_prepared_data) / "tokenizer.model")
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    stdlib = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    texts = [TOKENIZER_CHECK_TEXT] + [
        Path(f).read_text(errors="replace")[:4000] for f in stdlib[:5]
    ]
    for text in texts:
        ids = sp.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == sp.decode(ids)
    assert hf.eos_token_id == sp.eos_id and hf.pad_token_id == sp.pad_id


def _config_only(tmp_path: Path, **overrides) -> Path:
    transformers.LlamaConfig(**{**LLAMA, **overrides}).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "overrides, says",
    [
        ({"num_key_value_heads": 2}, "num_key_value_heads=2 differs from num_attention_heads=4"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type='linear'",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_what_is_not_exact_is_refused_naming_the_key(tmp_path, capsys, overrides, says):
    hf_dir = _config_only(tmp_path / "hf", **overrides)
    assert import_llama(hf_dir, tmp_path / "run", tmp_path / "no_data") == 2
    err = capsys.readouterr().err
    assert f"cannot convert {hf_dir} exactly: config.json has" in err and says in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_types_and_fixed_keys_are_refused(tmp_path, capsys, hf_dir, run_dir):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert import_llama(tmp_path / "gpt2", tmp_path / "run", tmp_path) == 2
    known = "big_bird, llama, longformer, roberta"
    assert f"HF model_type='gpt2' has no converter; known model types: {known}" in (
        capsys.readouterr().err
    )
    assert import_llama(hf_dir, tmp_path / "run", tmp_path, "model.d_model=128") == 2
    assert "model.d_model cannot be overridden: the HF checkpoint fixes it (d_model=64)" in (
        capsys.readouterr().err
    )
    assert import_llama(hf_dir, run_dir, tmp_path) == 2
    assert "already holds checkpoints (newest step 0): import into a new directory" in (
        capsys.readouterr().err
    )


def test_a_recipe_pattern_is_kept_and_full_attention_is_the_default(hf_dir, tmp_path):
    fixed = {"model": LlamaConverter().from_hf(hf_dir)[0], "attention": {"causal": True}}
    sparse = import_config(None, [*LLAMA_RUN, "attention.window_blocks=2"], fixed, tmp_path)
    assert sparse.attention.window_blocks == 2 and uncovered_layers(sparse) == [0, 1]
    full = import_config(None, [*LLAMA_RUN, "attention.block_size=16"], fixed, tmp_path)
    assert full.attention.window_blocks == SEQ // 16 and uncovered_layers(full) == []


def test_python_m_train_resume_continues_the_imported_run(run_dir, tmp_path):
    from train.__main__ import main as train_main

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    args = ["--config", str(copy / "config.yaml"), "--resume", f"train.run_dir={copy}"]
    assert train_main(args) == 0
    progress = CheckpointManager(CheckpointArgs(), copy).load_latest()["progress"]
    losses = progress["losses"]
    assert progress["step"] == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
