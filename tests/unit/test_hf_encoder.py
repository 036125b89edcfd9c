"""HF RoBERTa / Longformer / BigBird <-> halotron's encoder (model/encoder.py,
train/hf_encoder.py), with transformers' own forward as the oracle: tiny random masked-LM
models give the same logits as the converted encoder: full attention; Longformer's window with
global tokens and global projections, one window or one per layer; BigBird original_full, and
block_sparse (the window and the global blocks alone, and with the random blocks, HF's random
table replaced by halotron's own draw; full attention at lengths where HF switches to it). A
round trip gives identical tensors; a Longformer imported into a run exports to a directory
AutoModelForMaskedLM loads with the same logits, and `python -m train --resume` continues it
(MLM); a RoBERTa imported at a longer train.seq_len becomes a Longformer whose positions are
copied out.

    python -m pytest -q tests/unit/test_hf_encoder.py
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.registry import build_model  # noqa: E402
from model.sparse_pattern import SparsityConfig  # noqa: E402
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
)
from tests.hf_cases import tokens as any_tokens  # noqa: E402
from train.checkpoint import CheckpointArgs, CheckpointManager  # noqa: E402
from train.config import load_config  # noqa: E402
from train.hf import CONVERTERS, import_config, main, uncovered_layers  # noqa: E402
from train.hf_encoder import LongformerConverter, requested_seq_len  # noqa: E402

TINY = dict(
    vocab_size=VOCAB,
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
ENCODER_RUN = [*RUN, "attention.block_size=16", "data.objective=mlm"]
MASKED_LM = transformers.AutoModelForMaskedLM


def make_hf(kind: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random <kind>ForMaskedLM saved in `out`; norm gains and every bias random too."""
    config_cls, defaults = KINDS[kind]
    return save_random(MASKED_LM, config_cls(**{**TINY, **defaults, **overrides}), out, seed)


def tokens(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    # From 4: no pad id (RoBERTa's 1, BigBird's 0), whose HF position is the padding row.
    return any_tokens(batch, seq, low=4)


def converted(kind: str, hf_dir: Path, tmp: Path, *extra: str) -> tuple[torch.nn.Module, object]:
    """The halotron encoder of the HF model in `hf_dir` and its cfg, as `python -m train.hf
    import` builds them (from_hf, fit_to at the run's seq_len, import_config)."""
    converter = CONVERTERS[kind]
    model, attention, state = converter.from_hf(hf_dir)
    run = [*ENCODER_RUN, *extra]
    seq_len = requested_seq_len(None, run)
    model, attention, state = converter.fit_to(model, attention, state, seq_len)
    run = [o for o in run if o.split("=")[0].split(".")[-1] not in attention]  # fixed: not given
    cfg = import_config(None, run, {"model": model, "attention": attention}, tmp)
    return encoder_of(cfg, state), cfg


def encoder_of(cfg, state: dict[str, torch.Tensor], attention: SparsityConfig | None = None):
    """The encoder of `cfg` (with `attention` in place of its pattern) holding `state`."""
    encoder = build_model(cfg.model, attention or cfg.attention)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def max_diff(ours, hf_model, ids, global_mask=None, padding_mask=None, step: int = 0) -> float:
    """Max abs logit difference on the real tokens; the models run in the mode they are in
    (from_pretrained gives eval)."""
    kwargs = {} if global_mask is None else {"global_attention_mask": global_mask.long()}
    real = torch.ones_like(ids, dtype=torch.bool)
    if padding_mask is not None:
        kwargs["attention_mask"] = (~padding_mask).long()
        real = ~padding_mask
    with torch.no_grad():
        mine = ours(ids, step=step, padding_mask_bn=padding_mask, global_mask_bn=global_mask)
        theirs = hf_model(ids, **kwargs).logits
    return logit_diff(mine[real], theirs[real])


@pytest.mark.parametrize("kind", ["roberta", "big_bird"])
def test_full_attention_encoders_give_hf_logits(kind, tmp_path):
    hf_dir = make_hf(kind, tmp_path / "hf")
    ours, cfg = converted(kind, hf_dir, tmp_path / "run")
    assert uncovered_layers(cfg) == [] and not cfg.attention.causal
    err = max_diff(ours, hf_load(MASKED_LM, hf_dir), tokens())
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
    hf_model = hf_load(MASKED_LM, hf_dir)
    err_local = max_diff(ours, hf_model, tokens())
    err_global = max_diff(ours, hf_model, tokens(), glob)
    print(f"longformer window 32: {err_local:.2e}; with global tokens: {err_global:.2e}")
    assert err_local < 1e-4 and err_global < 1e-4, (err_local, err_global)
    # The global projections matter: without them the global rows differ.
    plain, _ = converted("longformer", hf_dir, tmp_path / "run")
    for block in plain.blocks:
        block.attn.qkv_global = None
    assert max_diff(plain, hf_model, tokens(), glob) > 1e-2


def test_longformer_windows_per_layer_give_hf_logits_and_round_trip(tmp_path):
    """attention_window as a list: the first layer's window is attention.window_tokens, the
    others attention.layers entries; export writes the list back."""
    windows = [16, 64, 32]  # HF pads to the widest window: each must divide it
    hf_dir = make_hf("longformer", tmp_path / "hf", num_hidden_layers=3, attention_window=windows)
    ours, cfg = converted("longformer", hf_dir, tmp_path / "run")
    a = cfg.attention
    assert a.window_tokens == 16 and len(a.layers) == 2
    assert LongformerConverter.windows(cfg) == windows and uncovered_layers(cfg) == [0, 1, 2]
    glob = torch.zeros(2, SEQ, dtype=torch.bool)
    glob[0, [0, 50]] = True
    hf_model = hf_load(MASKED_LM, hf_dir)
    err = max_diff(ours, hf_model, tokens(), glob)
    # The windows per layer matter: the first layer's everywhere gives other logits.
    one_window = encoder_of(cfg, ours.state_dict(), replace(a, layers=()))
    assert max_diff(one_window, hf_model, tokens(), glob) > 1e-2
    CONVERTERS["longformer"].to_hf(cfg, ours.state_dict(), tmp_path / "out")
    exported = hf_load(MASKED_LM, tmp_path / "out")
    assert exported.config.attention_window == windows
    want, got = hf_tensors(hf_dir), hf_tensors(tmp_path / "out")
    assert want.keys() == got.keys() and all(torch.equal(got[k], t) for k, t in want.items())
    err_export = max_diff(ours, exported, tokens(), glob)
    print(f"longformer windows {windows}: import {err:.2e}, export {err_export:.2e}")
    assert err < 1e-4 and err_export < 1e-4, (err, err_export)


# BigBird block_sparse: block 8, 2 random blocks per query block, 128 tokens = 16 blocks (HF
# attends fully up to (5 + 2 * 2) * 8 = 72 tokens); dropout 0, so that HF in training mode
# differs from eval only by its random draw.
BLOCK_SPARSE = dict(
    attention_type="block_sparse", block_size=8, num_random_blocks=2, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def block_sparse(tmp_path_factory):
    """(HF directory, the imported encoder, its cfg) of a tiny block_sparse BigBird."""
    tmp = tmp_path_factory.mktemp("big_bird_block_sparse")
    hf_dir = make_hf("big_bird", tmp / "hf", **BLOCK_SPARSE)
    ours, cfg = converted("big_bird", hf_dir, tmp / "run")
    return hf_dir, ours, cfg


def hf_random_table(pattern: SparsityConfig, seq_len: int, n_heads: int, layer: int, step: int):
    """halotron's random draw of `layer` in the format of HF's
    BigBirdBlockSparseAttention._bigbird_block_rand_mask_with_head: per head, int32
    [n_blocks - 2, r], the random key blocks of query blocks 1 .. n_blocks - 2 (HF leaves
    the global first and last rows out)."""
    table = pattern.random_table(seq_len, n_heads, layer, step).expand(n_heads, -1, -1)
    assert (table[:, 1:-1] >= 0).all()  # every row has r blocks to draw, as HF's table needs
    return list(table[:, 1:-1].numpy().astype(np.int32))


def inject_random_table(monkeypatch, table_of) -> None:
    """HF's block-sparse attention takes `table_of(layer, seq_len, n_heads)` as its random
    table (the attention of layer i has seed=i; seq_len is the padded length)."""
    from transformers.models.big_bird import modeling_big_bird

    def table(self, from_seq_length, num_heads, **_):
        return table_of(self.seed, from_seq_length, num_heads)

    cls = modeling_big_bird.BigBirdBlockSparseAttention
    monkeypatch.setattr(cls, "_bigbird_block_rand_mask_with_head", table)


def test_bigbird_block_sparse_window_and_global_blocks_give_hf_logits(block_sparse, monkeypatch):
    """The 3-block window and the first and last block global, without random blocks. HF cannot
    run without them (its reshape of the empty random blocks fails), so its random blocks are
    all one block whose keys are masked (attention_mask 0: they weigh exp(-10000) = 0), and the
    encoder has random_blocks=0 and that block padded."""
    hf_dir, ours, cfg = block_sparse
    a, hole = cfg.attention, 7
    assert (a.block_size, a.window_blocks, a.global_blocks, a.window_tokens) == (8, 3, 2, 0)
    inject_random_table(
        monkeypatch, lambda layer, n, heads: [np.full((n // 8 - 2, 2), hole, np.int32)] * heads
    )
    pad = torch.zeros(2, SEQ, dtype=torch.bool)
    pad[:, hole * 8 : hole * 8 + 8] = True
    hf_model = hf_load(MASKED_LM, hf_dir)
    no_random = encoder_of(cfg, ours.state_dict(), replace(a, random_blocks=0))
    err = max_diff(no_random, hf_model, tokens(), padding_mask=pad)
    print(f"big_bird block_sparse, window and global blocks: max |logit difference| {err:.2e}")
    assert err < 1e-4, err
    # Each part matters: a wider window, the last block not global, random blocks.
    for other in ({"window_blocks": 5}, {"global_blocks": 1}, {"random_blocks": 2}):
        changed = encoder_of(cfg, ours.state_dict(), replace(a, **{"random_blocks": 0, **other}))
        assert max_diff(changed, hf_model, tokens(), padding_mask=pad) > 1e-2, other


def test_bigbird_block_sparse_gives_hf_logits_given_the_random_blocks(block_sparse, monkeypatch):
    """HF in training mode (dropout 0) with halotron's own random draw of each layer and head
    as its random table: HF's block-sparse arithmetic is the oracle, only the choice of the
    random blocks is injected. 128 tokens, 123 (HF pads to 128; the encoder's last block is
    partial) and a padded batch."""
    hf_dir, ours, cfg = block_sparse
    a, n_layers = cfg.attention, cfg.model.n_layers
    assert a.random_blocks == 2 and a.random_per_head and uncovered_layers(cfg) == [0, 1]
    hf_model = hf_load(MASKED_LM, hf_dir).train()
    # HF's own draw is a pattern of the same kind: per row, distinct blocks outside the window
    # and the global blocks (only its choice differs from halotron's).
    own = hf_model.bert.encoder.layer[0].attention.self
    plan = own._get_rand_attn_plan(SEQ, 8, 2)
    drawn = own._bigbird_block_rand_mask_with_head(
        from_seq_length=SEQ, to_seq_length=SEQ, from_block_size=8, to_block_size=8,
        num_heads=4, plan_from_length=plan[0], plan_num_rand_blocks=plan[1],
    )  # fmt: skip
    for row, blocks in enumerate(np.stack(drawn).transpose(1, 0, 2), start=1):
        outside = set(range(16)) - {0, 15, row - 1, row, row + 1}
        assert all(len(set(b)) == 2 and set(b) <= outside for b in blocks), (row, blocks)

    step = 0
    inject_random_table(
        monkeypatch,
        lambda layer, n, heads: hf_random_table(
            a.for_layer(layer, n_layers), n, heads, layer, step
        ),
    )
    pad = torch.zeros(2, SEQ, dtype=torch.bool)
    pad[1, -40:] = True
    pad[0, :8] = True
    errs = {
        "128 tokens": max_diff(ours, hf_model, tokens()),
        "123 tokens": max_diff(ours, hf_model, tokens(seq=123)),
        "padded": max_diff(ours, hf_model, tokens().masked_fill(pad, 0), padding_mask=pad),
    }
    print(f"big_bird block_sparse with halotron's random blocks: {errs}")
    assert max(errs.values()) < 1e-4, errs
    step = 1  # HF gets the draw of another step: the random blocks matter
    assert max_diff(ours, hf_model, tokens()) > 1e-2


def test_bigbird_block_sparse_round_trip_and_short_sequences(block_sparse, tmp_path):
    """Export writes block_sparse back (block size, num_random_blocks); at train.seq_len <= 72
    tokens, where HF attends fully, the import is full attention and gives HF's logits."""
    hf_dir, ours, cfg = block_sparse
    CONVERTERS["big_bird"].to_hf(cfg, ours.state_dict(), tmp_path / "out")
    config = hf_load(MASKED_LM, tmp_path / "out").config
    assert config.attention_type == "block_sparse"
    assert (config.block_size, config.num_random_blocks) == (8, 2)
    want, got = hf_tensors(hf_dir), hf_tensors(tmp_path / "out")
    assert want.keys() == got.keys() and all(torch.equal(got[k], t) for k, t in want.items())
    short, short_cfg = converted("big_bird", hf_dir, tmp_path / "run", "train.seq_len=72")
    assert uncovered_layers(short_cfg) == [] and short_cfg.attention.random_blocks == 0
    hf_model = hf_load(MASKED_LM, hf_dir)
    err = max_diff(short, hf_model, tokens(seq=72))
    assert hf_model.bert.attention_type == "original_full"  # HF switched
    print(f"big_bird block_sparse at 72 tokens (HF: original_full): {err:.2e}")
    assert err < 1e-4, err


@pytest.mark.parametrize("kind", ["roberta", "longformer", "big_bird"])
def test_padding_gives_hf_logits_on_the_real_tokens(kind, tmp_path):
    """HF's attention_mask = not padding_mask; RoBERTa's and Longformer's positions count the
    real tokens from pad_token_id + 1 and give the pads padding_idx, as the encoder does without
    position_ids (BigBird's count every token from 0)."""
    hf_dir = make_hf(kind, tmp_path / "hf")
    ours, _ = converted(kind, hf_dir, tmp_path / "run")
    pad = torch.zeros(2, SEQ, dtype=torch.bool)
    pad[1, -40:] = True  # right padding
    pad[0, :8] = True  # left padding: HF's positions start after it
    ids = tokens().masked_fill(pad, 0 if kind == "big_bird" else 1)  # the pad id
    err = max_diff(ours, hf_load(MASKED_LM, hf_dir), ids, padding_mask=pad)
    print(f"{kind} with padding: max |logit difference| on real tokens {err:.2e}")
    assert err < 1e-4, err


@pytest.mark.parametrize("kind", ["roberta", "longformer", "big_bird"])
def test_round_trip_gives_identical_tensors(kind, tmp_path):
    hf_dir = make_hf(kind, tmp_path / "hf")
    ours, cfg = converted(kind, hf_dir, tmp_path / "run")
    CONVERTERS[kind].to_hf(cfg, ours.state_dict(), tmp_path / "out")
    want, got = hf_tensors(hf_dir), hf_tensors(tmp_path / "out")
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert max_diff(ours, hf_load(MASKED_LM, tmp_path / "out"), tokens()) < 1e-4


@pytest.fixture(scope="module")
def longformer_run(tiny_mlm_data, tmp_path_factory) -> tuple[Path, Path]:
    hf_dir = make_hf("longformer", tmp_path_factory.mktemp("hf_longformer"))
    run = tmp_path_factory.mktemp("imported") / "run"
    assert import_run(hf_dir, run, tiny_mlm_data, *ENCODER_RUN) == 0
    return hf_dir, run


def test_import_export_and_resume_of_a_longformer(longformer_run, tmp_path):
    from train.__main__ import main as train_main

    hf_dir, run_dir = longformer_run
    state = CheckpointManager(CheckpointArgs(), run_dir).load_latest()
    assert state is not None and state["progress"]["step"] == 0
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.model.arch == "encoder" and cfg.attention.global_projections
    glob = torch.zeros(2, SEQ, dtype=torch.bool)
    glob[:, 0] = True
    model = run_model(run_dir)
    assert max_diff(model, hf_load(MASKED_LM, hf_dir), tokens(), glob) < 1e-4
    out = tmp_path / "hf_out"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    exported = hf_load(MASKED_LM, out)
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
    assert requested_seq_len(None, ENCODER_RUN) == SEQ  # what python -m train.hf import passes
    model, attention, state = CONVERTERS["roberta"].fit_to(model, attention, state, SEQ)
    assert model["max_positions"] == SEQ + 2 and attention["window_tokens"] == SEQ // 2
    assert attention["global_projections"]
    pos = state["pos_embed.weight"]
    old = hf_tensors(hf_dir)["roberta.embeddings.position_embeddings.weight"]
    assert torch.equal(pos[:2], old[:2])
    assert torch.equal(pos[2 : SEQ // 2 + 2], old[2:]) and torch.equal(pos[SEQ // 2 + 2 :], old[2:])
    fixed = {"model": model, "attention": attention}
    cfg = import_config(None, ENCODER_RUN, fixed, tmp_path / "run")
    ours = encoder_of(cfg, state)
    exports = [c for c, conv in CONVERTERS.items() if conv.arch == "encoder" and conv.accepts(cfg)]
    assert exports == ["longformer"]
    CONVERTERS["longformer"].to_hf(cfg, ours.state_dict(), tmp_path / "out")
    glob = torch.zeros(2, SEQ, dtype=torch.bool)
    glob[:, 0] = True
    err = max_diff(ours, hf_load(MASKED_LM, tmp_path / "out"), tokens(), glob)
    print(f"roberta -> longformer export: max |logit difference| {err:.2e}")
    assert err < 1e-4, err


@pytest.mark.parametrize(
    "kind, overrides, says",
    [
        ("big_bird", {"rescale_embeddings": True}, "rescale_embeddings=true"),
        ("big_bird", {"use_bias": False}, "use_bias=false"),
        ("roberta", {"hidden_act": "relu"}, "hidden_act='relu'"),
        ("longformer", {"attention_window": [32, 33]}, "attention_window=[32, 33]: each window"),
        ("longformer", {"attention_window": [32, 64, 32]}, "one window per layer"),
        ("roberta", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ],
)
def test_what_is_not_exact_is_refused_naming_the_key(tmp_path, kind, overrides, says):
    config_cls, defaults = KINDS[kind]
    config_cls(**{**TINY, **defaults, **overrides}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json has") as e:
        CONVERTERS[kind].from_hf(tmp_path)
    assert says in str(e.value)
