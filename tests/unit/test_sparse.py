"""Exactness of the single-device block-sparse attention against dense masked attention.

pytest tests/unit/test_sparse.py
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.sparse import SparsityConfig, count_pairs, reference_attention, sparse_attention
from tests.tensor_probe import LargestTensor

PATTERNS = {
    "window": dict(window_blocks=3, global_blocks=0, random_blocks=0),
    "window+global": dict(window_blocks=3, global_blocks=2, random_blocks=0),
    "window+random": dict(window_blocks=3, global_blocks=0, random_blocks=2),
    "bigbird": dict(window_blocks=3, global_blocks=2, random_blocks=2),
    "dilated-per-head": dict(window_blocks=3, global_blocks=1, random_blocks=1, dilation=(1, 2, 3)),
    "global-tokens": dict(window_blocks=1, global_blocks=0, random_blocks=1, global_tokens=(5, 41)),
    "random-per-head": dict(
        window_blocks=3, global_blocks=1, random_blocks=2, random_per_head=True
    ),
    "bigbird-pool": dict(window_blocks=3, global_blocks=2, random_blocks=2, random_pool_blocks=4),
    # token windows: 10 tokens is not a multiple of the block (8); per-head dilation
    "token-window": dict(window_blocks=3, window_tokens=10, global_blocks=0, random_blocks=0),
    "token-window-bigbird-dilated": dict(
        window_blocks=3, window_tokens=6, global_blocks=1, random_blocks=2, dilation=(1, 2, 3)
    ),
}


def max_errors(
    cfg,
    seq_len,
    batch=2,
    heads=3,
    dim=8,
    dtype=torch.float64,
    padding=False,
    per_sample_global=False,
    layer=1,
    step=3,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=dtype).requires_grad_()
        for _ in range(3)
    )
    padding_mask = global_mask = None
    if padding:
        padding_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        padding_mask[0, -3:] = True
        padding_mask[-1, -cfg.block_size - 5 :] = True
    if per_sample_global:
        global_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        global_mask[0, [2, seq_len // 2 + 1]] = True
        global_mask[-1, seq_len - 4] = True
    out = sparse_attention(
        q, k, v, cfg, layer=layer, step=step, padding_mask=padding_mask, global_mask=global_mask
    )
    ref = reference_attention(q, k, v, cfg, layer, step, padding_mask, global_mask)
    upstream = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    ref_grads = torch.autograd.grad(ref, (q, k, v), upstream)
    errors = {"out": (out - ref).abs().max().item()}
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        errors[f"d{name}"] = (g - r).abs().max().item()
    return errors


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("causal", [False, True])
def test_every_pattern_matches_dense_fp32(name, causal):
    kwargs = dict(PATTERNS[name])
    if causal and kwargs["window_blocks"] == 3:
        kwargs["window_blocks"] = 2
    cfg = SparsityConfig(block_size=8, causal=causal, **kwargs)
    for seq_len, (padding, per_sample) in itertools.product(
        (64, 96), itertools.product([False, True], repeat=2)
    ):
        errors = max_errors(
            cfg, seq_len, dtype=torch.float32, padding=padding, per_sample_global=per_sample
        )
        assert max(errors.values()) < 1e-5, (name, causal, seq_len, padding, per_sample, errors)


def test_etc_tokens_match_dense():
    cfg = SparsityConfig(
        block_size=8, window_blocks=3, global_blocks=0, random_blocks=2, etc_tokens=3
    )
    errors = max_errors(cfg, 80, padding=True)
    assert max(errors.values()) < 1e-10, errors


def test_pattern_actually_is_sparse_and_uses_every_rule():
    # Guard against a vacuous oracle: each rule must change the mask.
    base = SparsityConfig(block_size=8, window_blocks=3, global_blocks=0, random_blocks=0)
    n = 128
    window = base.dense_mask(n)
    full = SparsityConfig(block_size=8, window_blocks=3, global_blocks=2, random_blocks=2)
    bigbird = full.dense_mask(n)
    assert window.sum() < bigbird.sum() < n * n
    glob = SparsityConfig(block_size=8, window_blocks=3, global_blocks=2, random_blocks=0)
    rand = SparsityConfig(block_size=8, window_blocks=3, global_blocks=0, random_blocks=2)
    assert (glob.dense_mask(n) & ~window).any() and (rand.dense_mask(n) & ~window).any()
    causal = SparsityConfig(block_size=8, window_blocks=2, global_blocks=1, causal=True)
    assert not torch.triu(causal.dense_mask(n)[0], diagonal=1).any()
    dilated = SparsityConfig(
        block_size=8, window_blocks=3, global_blocks=0, random_blocks=0, dilation=2
    )
    row = dilated.dense_mask(n)[0, 64]
    assert row[64] and row[66] and not row[65] and row[64 + 3 * 8 - 2]


def test_random_draw_is_reproducible_and_depends_on_seed_step_layer():
    cfg = SparsityConfig(block_size=8, window_blocks=3, global_blocks=2, random_blocks=3)
    a = cfg.random_table(512, 4, layer=2, step=7)
    assert torch.equal(a, cfg.random_table(512, 4, layer=2, step=7))
    assert not torch.equal(a, cfg.random_table(512, 4, layer=3, step=7))
    assert not torch.equal(a, cfg.random_table(512, 4, layer=2, step=8))
    other_seed = SparsityConfig(
        block_size=8, window_blocks=3, global_blocks=2, random_blocks=3, seed=1
    )
    assert not torch.equal(a, other_seed.random_table(512, 4, layer=2, step=7))
    rows = a[0]
    n_blocks = 64
    for i in range(1, n_blocks - 1):  # non-global query blocks
        drawn = rows[i][rows[i] >= 0].tolist()
        assert len(drawn) == len(set(drawn)) == 3
        assert all(abs(j - i) > 1 and j not in (0, n_blocks - 1) for j in drawn)


def test_count_pairs_equals_dense_mask_sum():
    for cfg in (
        SparsityConfig(block_size=8, window_blocks=3, global_blocks=2, random_blocks=2),
        SparsityConfig(
            block_size=8, window_blocks=2, global_blocks=1, random_blocks=1, causal=True
        ),
        SparsityConfig(
            block_size=8, window_blocks=3, global_blocks=1, random_blocks=1, dilation=(1, 2)
        ),
    ):
        heads = 2
        mask = cfg.dense_mask(128, n_heads=heads).expand(heads, -1, -1)
        assert count_pairs(cfg, 128, n_heads=heads) == int(mask.sum())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block=st.sampled_from([4, 8]),
    n_blocks=st.integers(1, 10),
    extra_tokens=st.integers(-3, 0),
    pool=st.integers(0, 5),
    half_window=st.integers(0, 2),
    window_tokens=st.sampled_from([0, 0, 2, 6, 12, 40]),
    global_blocks=st.integers(0, 2),
    random_blocks=st.integers(0, 3),
    causal=st.booleans(),
    dilation=st.sampled_from([1, 2, (1, 2), (2, 1)]),
    random_per_head=st.booleans(),
    padding=st.booleans(),
    per_sample_global=st.booleans(),
    batch=st.integers(1, 2),
    layer=st.integers(0, 3),
    step=st.integers(0, 5),
)
def test_random_configurations_match_dense(
    block,
    n_blocks,
    extra_tokens,
    pool,
    half_window,
    window_tokens,
    global_blocks,
    random_blocks,
    causal,
    dilation,
    random_per_head,
    padding,
    per_sample_global,
    batch,
    layer,
    step,
):
    window = half_window + 1 if causal else 2 * half_window + 1
    cfg = SparsityConfig(
        block_size=block,
        window_blocks=window,
        window_tokens=window_tokens,
        global_blocks=global_blocks,
        random_blocks=random_blocks,
        causal=causal,
        dilation=dilation,
        random_per_head=random_per_head,
        random_pool_blocks=pool,
    )
    seq_len = block * n_blocks + extra_tokens  # a partial last block when extra_tokens < 0
    if padding and seq_len <= block + 5:
        padding = False
    errors = max_errors(
        cfg,
        seq_len,
        batch=batch,
        heads=2,
        padding=padding,
        per_sample_global=per_sample_global and seq_len > 8,
        layer=layer,
        step=step,
    )
    assert max(errors.values()) < 1e-10, errors


def _largest_tensor(seq_len, causal):
    cfg = SparsityConfig(
        block_size=64,
        window_blocks=2 if causal else 3,
        global_blocks=2,
        random_blocks=3,
        causal=causal,
    )
    q, k, v = (torch.randn(1, 2, seq_len, 16, requires_grad=True) for _ in range(3))
    padding = torch.zeros(1, seq_len, dtype=torch.bool)
    padding[0, -10:] = True
    with LargestTensor() as probe:
        out = sparse_attention(q, k, v, cfg, padding_mask=padding)
        out.sum().backward()
    return probe.largest


@pytest.mark.parametrize("causal", [False, True])
def test_no_seq_by_seq_tensor_in_forward_or_backward(causal):
    small, large = _largest_tensor(4096, causal), _largest_tensor(8192, causal)
    # Every intermediate is O(seq * keys-per-query): it at most doubles with seq, and stays far
    # below one seq x seq tensor (67M elements at 8192).
    assert large <= 2.2 * small, (small, large)
    assert large < 8192 * 8192 // 16, large


_PEAK_SCRIPT = """
import ctypes, sys, torch
from model.sparse import SparsityConfig, sparse_attention
torch.set_num_threads(1)
n = int(sys.argv[1])
cfg = SparsityConfig(block_size=64, window_blocks=3, global_blocks=2, random_blocks=3)
# Warm up at a small size so one-time allocator / thread-pool costs are not counted.
w = torch.randn(1, 4, 2048, 64, requires_grad=True)
sparse_attention(w, w, w, cfg).sum().backward()
del w
q, k, v = (torch.randn(1, 4, n, 64, requires_grad=True) for _ in range(3))
grad = torch.randn(1, 4, n, 64)
ctypes.CDLL("libc.so.6").malloc_trim(0)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark (VmHWM) here
out = sparse_attention(q, k, v, cfg)
out.backward(grad)
print(status("VmHWM:") - base)
"""


@pytest.mark.bench  # measures process memory: make bench, not make test
def test_peak_memory_grows_linearly():
    import subprocess
    import sys

    def peak_kib(n):
        result = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(n)],
            check=True,
            capture_output=True,
            text=True,
            timeout=240,
        )
        return int(result.stdout.strip().splitlines()[-1])

    small, large = peak_kib(8192), peak_kib(16384)
    assert large <= 2.2 * small, (small, large)


@pytest.mark.parametrize(
    "kwargs, seq_len",
    [
        (dict(block_size=64), 1000),  # not a multiple of the block
        (dict(block_size=64, window_blocks=9), 512),  # window wider than the sequence
        (dict(block_size=64, window_blocks=3, dilation=4), 200),  # dilated reach past both ends
        (dict(block_size=64, global_blocks=9), 300),  # more global blocks than blocks
        (dict(block_size=8, global_tokens=(70,)), 64),  # a global position past the end
        (dict(block_size=16, etc_tokens=40, random_blocks=2), 33),
        (dict(block_size=16, window_blocks=4, causal=True, random_blocks=3), 7),  # < one block
        (dict(block_size=16, window_tokens=40, random_blocks=2), 37),  # token window > seq
        (dict(block_size=16, window_tokens=9, causal=True, dilation=3), 70),
    ],
)
def test_any_length_matches_dense(kwargs, seq_len):
    """HF BigBird/Longformer accept any length; so does sparse_attention, exactly."""
    cfg = SparsityConfig(**kwargs)
    errors = max_errors(cfg, seq_len, batch=2, heads=2, padding=True)
    assert max(errors.values()) < 1e-10, errors


def test_a_sequence_length_must_be_positive():
    with pytest.raises(ValueError, match="sequence length 0"):
        SparsityConfig().validate_seq_len(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window_blocks=4), "window_blocks=4 must be odd"),
        (dict(causal=True, etc_tokens=4), "etc_tokens=4 cannot be used with causal"),
        (dict(block_size=0), "block_size=0"),
        (dict(random_blocks=-1), "random_blocks=-1"),
        (dict(dilation=0), "dilation"),
        (dict(global_tokens=(-1,)), "global_tokens"),
    ],
)
def test_invalid_configs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_bad_shapes_and_per_head_dilation_mismatch():
    cfg = SparsityConfig(
        block_size=8, window_blocks=3, global_blocks=0, random_blocks=0, dilation=(1, 2)
    )
    q = torch.randn(1, 3, 64, 8)
    with pytest.raises(ValueError, match="dilation has 2 values but the layer has 3 heads"):
        sparse_attention(q, q, q, cfg)
    with pytest.raises(ValueError, match="same shape"):
        sparse_attention(q, q[:, :, :32], q, SparsityConfig(block_size=8, global_blocks=0))
    with pytest.raises(ValueError, match="padding_mask must be"):
        sparse_attention(
            q,
            q,
            q,
            SparsityConfig(block_size=8, global_blocks=0),
            padding_mask=torch.zeros(1, 32, dtype=torch.bool),
        )
