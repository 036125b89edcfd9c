"""HF RoBERTa / Longformer / BigBird <-> halotron's encoder (model/encoder.py,
train/hf_encoder.py), with transformers' own forward as the oracle: tiny random masked-LM
models give the same logits as the converted encoder (full attention, Longformer's window with
global tokens and global projections, BigBird original_full and block_sparse without random
blocks); a round trip gives identical tensors; a Longformer imported into a run exports to a
directory AutoModelForMaskedLM loads with the same logits, and `python -m train --resume`
continues it (MLM); a RoBERTa imported at a longer train.seq_len becomes a Longformer whose
positions are copied out.

    python -m pytest -q tests/unit/test_hf_encoder.py
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.encoder import Encoder  # noqa: E402
from train.checkpoint import CheckpointArgs, CheckpointManager  # noqa: E402
from train.config import config_from_dict, load_config  # noqa: E402
from train.export import consolidated_state_dict  # noqa: E402
from train.hf import CONVERTERS, import_config, main, uncovered_layers  # noqa: E402
from train.hf_encoder import requested_seq_len  # noqa: E402

SEQ = 128
TINY = dict(
    vocab_size=512,  # the test corpus tokenizer's (tests/conftest.py)
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    initializer_range=0.1,
    layer_norm_eps=1e-5,
)
KINDS = {
    "roberta": (transformers.RobertaConfig, dict(max_position_embeddings=SEQ + 2)),
    "longformer": (
        transformers.LongformerConfig,
        dict(max_position_embeddings=SEQ + 2, attention_window=32),
    ),
    "big_bird": (
        transformers.BigBirdConfig,
        dict(max_position_embeddings=SEQ, attention_type="original_full"),
    ),
}
RUN = [
    f"train.seq_len={SEQ}", "attention.block_size=16", "train.micro_batch_size=2",
    "train.steps=2", "train.eval_batches=1", "logging.wandb_mode=disabled",
    "logging.progress_bar=false", "data.objective=mlm",
]  # fmt: skip


def make_hf(kind: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random <kind>ForMaskedLM saved in `out`; norm gains and every bias random too."""
    config_cls, defaults = KINDS[kind]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **defaults, **overrides})
    model = transformers.AutoModelForMaskedLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def tokens(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    # From 4: no pad id (RoBERTa's 1, BigBird's 0), whose HF position is the padding row.
    return torch.randint(4, 512, (batch, seq), generator=torch.Generator().manual_seed(1))


def converted(kind: str, hf_dir: Path, tmp: Path, *extra: str) -> tuple[Encoder, object]:
    """The halotron encoder of the HF model in `hf_dir` (converter + import_config) and cfg."""
    model, attention, state = CONVERTERS[kind].from_hf(hf_dir)
    run = [o for o in RUN if o.split("=")[0].split(".")[-1] not in attention]  # fixed: not given
    cfg = import_config(None, [*run, *extra], {"model": model, "attention": attention}, tmp)
    encoder = Encoder(cfg.model, cfg.attention)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval(), cfg


def max_diff(ours: Encoder, hf_model, ids: torch.Tensor, global_mask=None) -> float:
    kwargs = {} if global_mask is None else {"global_attention_mask": global_mask.long()}
    with torch.no_grad():
        mine = ours(ids, global_mask_bn=global_mask)
        theirs = hf_model.eval()(ids, **kwargs).logits
    assert mine.abs().max() > 1.0  # logits far from flat: the comparison has teeth
    return float((mine - theirs).abs().max())


def hf_load(path: Path):
    return transformers.AutoModelForMaskedLM.from_pretrained(path, attn_implementation="eager")


@pytest.mark.parametrize("kind", ["roberta", "big_bird"])
def test_full_attention_encoders_give_hf_logits(kind, tmp_path):
    hf_dir = make_hf(kind, tmp_path / "hf")
    ours, cfg = converted(kind, hf_dir, tmp_path / "run")
    assert uncovered_layers(cfg) == [] and not cfg.attention.causal
    err = max_diff(ours, hf_load(hf_dir), tokens())
    print(f"{kind} full attention: max |logit difference| {err:.2e}")
    assert err < 1e-4, err


def test_longformer_window_global_tokens_and_projections_give_hf_logits(tmp_path):
    hf_dir = make_hf("longformer", tmp_path / "hf")
    ours, cfg = converted("longformer", hf_dir, tmp_path / "run")
    a = cfg.attention
    assert a.window_tokens == 32 and a.global_projections and uncovered_layers(cfg) == [0, 1]
    glob = torch.zeros(2, SEQ, dtype=torch.bool)
    glob[0, [0, 50, 127]] = True
    glob[1, 7] = True
    hf_model = hf_load(hf_dir)
    err_local = max_diff(ours, hf_model, tokens())
    err_global = max_diff(ours, hf_model, tokens(), glob)
    print(f"longformer window 32: {err_local:.2e}; with global tokens: {err_global:.2e}")
    assert err_local < 1e-4 and err_global < 1e-4, (err_local, err_global)
    # The global projections matter: without them the global rows differ.
    plain, _ = converted("longformer", hf_dir, tmp_path / "run")
    for block in plain.blocks:
        block.attn.qkv_global = None
    assert max_diff(plain, hf_model, tokens(), glob) > 1e-2


def test_bigbird_block_sparse_imports_its_pattern(tmp_path):
    """HF's block_sparse mode cannot run without random blocks (num_random_blocks=0 fails in
    its reshape), and in eval its random blocks are all block 0, counted again on top of the
    global block 0: no union pattern equals it. The import keeps the pattern (block size,
    3-block window, first and last block global, halotron's own random draw)."""
    hf_dir = make_hf(
        "big_bird", tmp_path / "hf", attention_type="block_sparse", block_size=16,
        num_random_blocks=1,
    )  # fmt: skip
    ours, cfg = converted("big_bird", hf_dir, tmp_path / "run")
    a = cfg.attention
    assert (a.block_size, a.window_blocks, a.global_blocks, a.random_blocks) == (16, 3, 2, 1)
    assert uncovered_layers(cfg) == [0, 1]  # 8 blocks: really sparse
    hf_model = hf_load(hf_dir)
    assert hf_model.config.attention_type == "block_sparse"
    err = max_diff(ours, hf_model, tokens())
    print(f"big_bird block_sparse (r=1, eval) vs halotron's pattern: {err:.2e} (not matched)")


@pytest.mark.parametrize("kind", ["roberta", "longformer", "big_bird"])
def test_padding_gives_hf_logits_on_the_real_tokens(kind, tmp_path):
    """HF's attention_mask = not padding_mask; RoBERTa's and Longformer's positions count the
    real tokens from pad_token_id + 1 and give the pads padding_idx, as the encoder does without
    position_ids (BigBird's count every token from 0)."""
    hf_dir = make_hf(kind, tmp_path / "hf")
    ours, _ = converted(kind, hf_dir, tmp_path / "run")
    ids = tokens()
    pad = torch.zeros(2, SEQ, dtype=torch.bool)
    pad[1, -40:] = True  # right padding
    pad[0, :8] = True  # left padding: HF's positions start after it
    ids = ids.masked_fill(pad, 0 if kind == "big_bird" else 1)  # the pad id
    with torch.no_grad():
        mine = ours(ids, padding_mask_bn=pad)
        theirs = hf_load(hf_dir).eval()(ids, attention_mask=(~pad).long()).logits
    err = float((mine - theirs)[~pad].abs().max())
    print(f"{kind} with padding: max |logit difference| on real tokens {err:.2e}")
    assert err < 1e-4, err


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


@pytest.mark.parametrize("kind", ["roberta", "longformer", "big_bird"])
def test_round_trip_gives_identical_tensors(kind, tmp_path):
    hf_dir = make_hf(kind, tmp_path / "hf")
    ours, cfg = converted(kind, hf_dir, tmp_path / "run")
    CONVERTERS[kind].to_hf(cfg, ours.state_dict(), tmp_path / "out")
    want, got = _tensors(hf_dir), _tensors(tmp_path / "out")
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert max_diff(ours, hf_load(tmp_path / "out"), tokens()) < 1e-4


@pytest.fixture(scope="module")
def longformer_run(tiny_mlm_data, tmp_path_factory) -> tuple[Path, Path]:
    hf_dir = make_hf("longformer", tmp_path_factory.mktemp("hf_longformer"))
    run = tmp_path_factory.mktemp("imported") / "run"
    args = ["import", "--hf-dir", str(hf_dir), "--out", str(run), *RUN]
    assert main([*args, f"data.path={tiny_mlm_data}"]) == 0
    return hf_dir, run


def halotron_model(run_dir: Path) -> Encoder:
    state_dict, config = consolidated_state_dict(run_dir)
    cfg = config_from_dict(config)
    model = Encoder(cfg.model, cfg.attention)
    model.load_state_dict(state_dict)
    return model.eval()


def test_import_export_and_resume_of_a_longformer(longformer_run, tmp_path):
    from train.__main__ import main as train_main

    hf_dir, run_dir = longformer_run
    state = CheckpointManager(CheckpointArgs(), run_dir).load_latest()
    assert state is not None and state["progress"]["step"] == 0
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.model.arch == "encoder" and cfg.attention.global_projections
    glob = torch.zeros(2, SEQ, dtype=torch.bool)
    glob[:, 0] = True
    model = halotron_model(run_dir)
    assert max_diff(model, hf_load(hf_dir), tokens(), glob) < 1e-4
    out = tmp_path / "hf_out"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    exported = hf_load(out)
    assert exported.config.model_type == "longformer"
    err = max_diff(model, exported, tokens(), glob)
    print(f"longformer export: max |logit difference| {err:.2e}")
    assert err < 1e-4, err
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    args = ["--config", str(copy / "config.yaml"), "--resume", f"train.run_dir={copy}"]
    assert train_main(args) == 0
    progress = CheckpointManager(CheckpointArgs(), copy).load_latest()["progress"]
    losses = progress["losses"]
    print(f"resumed MLM losses {losses}")
    assert progress["step"] == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_roberta_at_a_longer_seq_len_becomes_a_longformer(tmp_path):
    hf_dir = make_hf("roberta", tmp_path / "hf", max_position_embeddings=SEQ // 2 + 2)
    model, attention, state = CONVERTERS["roberta"].from_hf(hf_dir)
    assert requested_seq_len(None, RUN) == SEQ  # what python -m train.hf import passes
    model, attention, state = CONVERTERS["roberta"].fit_to(model, attention, state, SEQ)
    assert model["max_positions"] == SEQ + 2 and attention["window_tokens"] == SEQ // 2
    assert attention["global_projections"]
    pos = state["pos_embed.weight"]
    old = _tensors(hf_dir)["roberta.embeddings.position_embeddings.weight"]
    assert torch.equal(pos[:2], old[:2])
    assert torch.equal(pos[2 : SEQ // 2 + 2], old[2:]) and torch.equal(pos[SEQ // 2 + 2 :], old[2:])
    cfg = import_config(None, RUN, {"model": model, "attention": attention}, tmp_path / "run")
    ours = Encoder(cfg.model, cfg.attention)
    ours.load_state_dict(state, strict=True)
    exports = [c for c, conv in CONVERTERS.items() if conv.arch == "encoder" and conv.accepts(cfg)]
    assert exports == ["longformer"]
    CONVERTERS["longformer"].to_hf(cfg, ours.state_dict(), tmp_path / "out")
    glob = torch.zeros(2, SEQ, dtype=torch.bool)
    glob[:, 0] = True
    err = max_diff(ours.eval(), hf_load(tmp_path / "out"), tokens(), glob)
    print(f"roberta -> longformer export: max |logit difference| {err:.2e}")
    assert err < 1e-4, err


def test_the_encoder_refuses_parallel_layouts_at_load(tmp_path):
    model, attention, _ = CONVERTERS["roberta"].from_hf(make_hf("roberta", tmp_path / "hf"))
    fixed = {"model": model, "attention": attention}
    with pytest.raises(ValueError, match="parallel.tp=2: model.arch=encoder runs in one process"):
        import_config(None, [*RUN, "parallel.tp=2"], fixed, tmp_path / "run")
    with pytest.raises(ValueError, match="model.max_positions=130 is too few"):
        import_config(None, [*RUN, "train.seq_len=256"], fixed, tmp_path / "run")


@pytest.mark.parametrize(
    "kind, overrides, says",
    [
        ("big_bird", {"rescale_embeddings": True}, "rescale_embeddings=true"),
        ("big_bird", {"use_bias": False}, "use_bias=false"),
        ("roberta", {"hidden_act": "relu"}, "hidden_act='relu'"),
        ("longformer", {"attention_window": [32, 64]}, "attention_window=[32, 64]"),
        ("roberta", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ],
)
def test_what_is_not_exact_is_refused_naming_the_key(tmp_path, kind, overrides, says):
    config_cls, defaults = KINDS[kind]
    config_cls(**{**TINY, **defaults, **overrides}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json has") as e:
        CONVERTERS[kind].from_hf(tmp_path)
    assert says in str(e.value)
