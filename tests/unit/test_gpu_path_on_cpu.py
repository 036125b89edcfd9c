"""The GPU path of the attention, checked on CPU: no host synchronisation, bf16 without fp32
copies, one BlockMask per (step, layer), one compilation for every layer and step.

    pytest tests/unit/test_gpu_path_on_cpu.py

Host synchronisation: q, k, v live on the meta device, whose values, like a CUDA tensor's
without a sync, cannot be read on the host: any `.item()`, `bool()`, `.tolist()`, `.cpu()` or
`nonzero` of a tensor computed from them raises. The masks are host tensors, as the engines
pass them (train.engine.HOST_KEYS). The fused kernel itself is torch's FlexAttention (no
meta implementation), so the flex paths run with a stand-in kernel of the same shape; all of
our code around it (plans, BlockMask, exchanges' local parts, the global merge) runs for real.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model.sparse_flex as sparse_flex
from model.layers import LocalLinears
from model.sparse import SparsityConfig, reference_attention, sparse_attention
from model.transformer import Attention, ModelArgs
from parallel.context_parallel import cp_sparse_attention

PATTERN = dict(block_size=16, window_blocks=3, global_blocks=1, random_blocks=2)


def _masks(batch=2, seq=128):
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[1, -20:] = True
    marks = torch.zeros(batch, seq, dtype=torch.bool)
    marks[0, 70] = True
    return padding, marks


@pytest.mark.parametrize("path", ["sparse-blocked", "cp-blocked", "sparse-flex", "cp-flex"])
@pytest.mark.parametrize("pool", [0, 3])
def test_attention_reads_no_device_value(path, pool, monkeypatch):
    cfg = SparsityConfig(**PATTERN, random_pool_blocks=pool)
    padding, marks = _masks()
    fused = path.endswith("flex")
    if fused:
        monkeypatch.setattr(sparse_flex, "flex_kernel", lambda q, k, v, block_mask, scale: q * 1.0)
    q, k, v = (
        torch.randn(2, 2, 128, 16, device="meta").requires_grad_(not fused) for _ in range(3)
    )
    backend = "flex" if fused else "blocked"
    for step in range(2):  # the second call reuses the cached plans
        if path.startswith("cp"):
            out = cp_sparse_attention(
                q, k, v, cfg, None, 1, step, padding, marks, backend=backend
            )  # fmt: skip
        else:
            out = sparse_attention(q, k, v, cfg, 1, step, padding, marks, backend=backend)
        assert out.device.type == "meta" and out.shape == q.shape
        if not fused:
            out.sum().backward()
    # and the check can fail: reading a value of a device tensor raises
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(q.sum() > 0)


def test_the_stand_in_check_catches_a_sync():
    # what the old global-query path did: a bool() of a mask on the device
    allowed = torch.ones(2, 128, dtype=torch.bool).to("meta")
    with pytest.raises(RuntimeError):
        bool(allowed.any(-1).all())


class _Float32Copies(TorchDispatchMode):
    """Records every float32 result of the shape of a q/k/v tensor."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                if tuple(t.shape) == self.shape:
                    self.seen.append(str(func))
        return out


def _bf16_attention(fused: bool, monkeypatch, encoder: bool = False):
    """A bf16 attention layer: the decoder's (causal, RoPE) or the encoder's (bidirectional, no
    RoPE, biases: model/encoder.py's blocks use this class)."""
    monkeypatch.setattr("model.transformer.fused_attention", lambda device_type: fused)
    cfg = SparsityConfig(**PATTERN, causal=not encoder)
    args = ModelArgs(vocab_size=64, d_model=64, n_layers=1, n_heads=4)
    backend = "flex" if fused else "blocked"
    torch.manual_seed(0)
    attention_fn = functools.partial(sparse_attention, backend=backend)
    attn = Attention(args, cfg, attention_fn, 0, LocalLinears(), rope=not encoder, bias=encoder).to(
        torch.bfloat16
    )
    x = torch.randn(1, 128, 64, dtype=torch.bfloat16)
    return attn, x, torch.arange(128).view(1, -1)


def test_bf16_fused_attention_agrees_with_the_fp32_kernel(monkeypatch):
    attn, x, positions = _bf16_attention(True, monkeypatch)
    with torch.no_grad():
        fused = attn(x, positions, 0, None)
        monkeypatch.setattr("model.transformer.fused_attention", lambda device_type: False)
        attn.attention_fn = functools.partial(sparse_attention, backend="blocked")
        blocked = attn(x, positions, 0, None)
    assert fused.dtype == blocked.dtype == torch.bfloat16
    assert (fused.float() - blocked.float()).abs().max() < 2e-2


@pytest.mark.parametrize("encoder", [False, True], ids=["decoder", "encoder"])
@pytest.mark.parametrize("fused", [True, False])
def test_bf16_attention_makes_no_fp32_copy_of_q_k_v_on_the_fused_path(fused, encoder, monkeypatch):
    attn, x, positions = _bf16_attention(fused, monkeypatch, encoder)
    kernel_dtypes = []

    def kernel(q, k, v, block_mask, scale):  # the fused kernel (a higher-order op) stands in
        kernel_dtypes.extend([q.dtype, k.dtype, v.dtype])
        return q.clone()

    monkeypatch.setattr(sparse_flex, "flex_kernel", kernel)
    # RoPE rotates q and k in fp32 before the attention; count only the attention's copies
    monkeypatch.setattr("model.transformer.apply_rope", lambda t, p, theta: t)
    copies = _Float32Copies((1, 4, 128, 16))
    with torch.no_grad(), copies:
        out = attn(x, positions, 0, None)
    assert out.dtype == torch.bfloat16
    if fused:
        assert copies.seen == [], copies.seen
        assert kernel_dtypes == [torch.bfloat16] * 3
    else:  # the CPU kernel keeps its fp32 math: the check sees its copies
        assert len(copies.seen) >= 3


def test_one_block_mask_per_step_and_layer_for_every_micro_batch(monkeypatch):
    built = []
    real = sparse_flex.plan_block_mask
    monkeypatch.setattr(
        sparse_flex, "plan_block_mask", lambda *a, **kw: built.append(1) or real(*a, **kw)
    )
    cfg = SparsityConfig(**PATTERN, random_pool_blocks=4, seed=3)
    gen = torch.Generator().manual_seed(0)
    for layer in range(2):
        for _micro_batch in range(3):
            q, k, v = (torch.randn(1, 2, 128, 16, generator=gen) for _ in range(3))
            out = cp_sparse_attention(q, k, v, cfg, None, layer, step=5, backend="flex")
            ref = reference_attention(q, k, v, cfg, layer, 5)
            assert (out - ref).abs().max() < 1e-5
    assert len(built) == 2  # one per layer, not one per micro-batch


@pytest.mark.timeout(300)
def test_flex_compiles_once_for_every_layer_and_step(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(sparse_flex, "compile_on_cpu", True)
    monkeypatch.setattr(sparse_flex, "_compiled_flex", None)
    torch._dynamo.reset()
    counters.clear()
    cfg = SparsityConfig(**PATTERN, random_pool_blocks=4)
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for step in range(3):
        for layer in range(3):
            q, k, v = (torch.randn(1, 2, 256, 16, generator=gen) for _ in range(3))
            out = cp_sparse_attention(q, k, v, cfg, None, layer, step, backend="flex")
            # compiled, the kernel reads the block lists: still exact
            assert (out - reference_attention(q, k, v, cfg, layer, step)).abs().max() < 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1
    assert graphs == [graphs[0]] * 9, graphs
    torch._dynamo.reset()
