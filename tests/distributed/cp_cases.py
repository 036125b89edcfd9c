"""Per-rank bodies of the context-parallel tests (module level so spawned ranks can import them).

Every rank builds the same full q, k, v, upstream gradient and masks from a seed, runs the
single-device dense reference (`cfg.dense_mask` + `dense_attention`, with the padding) on the
whole sequence, runs `cp_sparse_attention` on its slice, and returns the max errors of its
slice of the output and of the q/k/v gradients (in fp32 also the output of the fused
FlexAttention path, `backend="flex"`). Used by test_context_parallel.py.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from model.sparse import SparsityConfig, dense_attention, reference_attention
from parallel.context_parallel import cp_sparse_attention, pad_for_cp
from parallel.traffic import TrafficCounter

BLOCK = 8
SEQ = 128  # 16 blocks: 4 per rank at P=4, so windows of more than 4 blocks reach are multi-hop

# name -> (SparsityConfig kwargs, padding, per-sample global mask)
PATTERNS: dict[str, tuple[dict, bool, bool]] = {
    "window-multihop": (dict(window_blocks=11, global_blocks=0, random_blocks=0), False, False),
    "window+global": (dict(window_blocks=5, global_blocks=2, random_blocks=0), False, False),
    "window+random": (dict(window_blocks=3, global_blocks=0, random_blocks=2), False, False),
    "bigbird": (dict(window_blocks=3, global_blocks=2, random_blocks=2), False, False),
    "dilated-per-head": (
        dict(window_blocks=5, global_blocks=1, random_blocks=1, dilation=(1, 2, 3)),
        False,
        False,
    ),
    "bigbird-pool": (
        dict(window_blocks=3, global_blocks=2, random_blocks=2, random_pool_blocks=8),
        False,
        False,
    ),
    "pool-per-head-dilated": (
        dict(
            window_blocks=3,
            global_blocks=1,
            random_blocks=3,
            random_pool_blocks=4,
            random_per_head=True,
            dilation=(1, 2, 1),
        ),
        True,
        True,
    ),
    "random-per-head": (
        dict(window_blocks=3, global_blocks=1, random_blocks=2, random_per_head=True),
        False,
        False,
    ),
    "global-tokens": (
        dict(window_blocks=3, global_blocks=0, random_blocks=1, global_tokens=(5, 77)),
        False,
        False,
    ),
    "sample-global": (dict(window_blocks=3, global_blocks=1, random_blocks=1), False, True),
    "etc": (dict(window_blocks=3, global_blocks=0, random_blocks=1, etc_tokens=3), False, False),
    "padding": (dict(window_blocks=3, global_blocks=2, random_blocks=2), True, False),
    "padding+sample-global": (
        dict(window_blocks=7, global_blocks=1, random_blocks=1, global_tokens=(60,)),
        True,
        True,
    ),
    # Token windows (attention.window_tokens), not multiples of the block: 70 tokens reach 35
    # (causal 69) tokens, more than a rank's 32 at P=4 (multi-hop); 10 tokens with dilation.
    "token-window-multihop": (
        dict(window_tokens=70, global_blocks=0, random_blocks=0),
        False,
        False,
    ),
    "token-window-bigbird-dilated": (
        dict(window_tokens=10, global_blocks=1, random_blocks=2, dilation=(1, 2, 3)),
        True,
        True,
    ),
    # attention.layers: the cases run layer 1, whose own pattern is this multi-hop, per-head
    # dilated token window (the base pattern is layer 0's).
    "per-layer": (
        dict(
            window_tokens=12,
            global_blocks=1,
            random_blocks=1,
            layers=({"layers": "1::2", "window_tokens": 40, "dilation": (1, 2, 1)},),
        ),
        False,
        False,
    ),
}
N_LAYERS = 3  # of the configs with attention.layers


# name -> (SparsityConfig kwargs, true sequence length): not a multiple of cp x block, and a
# window wider than the sequence; both padded inside.
LENGTHS: dict[str, tuple[dict, int]] = {
    "any-length-bigbird-pool": (
        dict(window_blocks=3, global_blocks=2, random_blocks=2, random_pool_blocks=4),
        83,
    ),
    "window-wider-than-sequence": (dict(window_blocks=41, global_blocks=1, random_blocks=1), 77),
}


def all_cases() -> list[dict]:
    cases = []
    for name, (kwargs, length) in LENGTHS.items():
        for causal in (False, True):
            kw = dict(kwargs, block_size=BLOCK, causal=causal, seed=7)
            if causal:
                kw["window_blocks"] = (kw["window_blocks"] + 1) // 2
            cases.append(
                dict(name=f"{name}/{'causal' if causal else 'bidir'}", cfg=kw, length=length,
                     padding=True, sample_global=True)
            )  # fmt: skip
    for name, (kwargs, padding, sample_global) in PATTERNS.items():
        for causal in (False, True):
            if causal and kwargs.get("etc_tokens"):
                continue  # refused by the config: ETC tokens see the future
            kw = dict(kwargs, block_size=BLOCK, causal=causal, seed=7)
            cases.append(
                dict(name=f"{name}/{'causal' if causal else 'bidir'}", cfg=kw,
                     padding=padding, sample_global=sample_global)
            )  # fmt: skip
    return cases


def make_inputs(case: dict, seq_len: int, batch: int, heads: int, dim: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, d_out = (
        torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=dtype) for _ in range(4)
    )
    padding_mask = global_mask = None
    if case.get("padding"):
        padding_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        padding_mask[0, -3:] = True
        padding_mask[-1, -(seq_len // 4 + 5) :] = True  # a whole rank's slice padded at P=4
    if case.get("sample_global"):
        global_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        global_mask[0, [2, seq_len // 2 + 1]] = True
        global_mask[-1, [seq_len - 4, 17]] = True
    return q, k, v, d_out, padding_mask, global_mask


def reference(q, k, v, cfg, layer, step, padding_mask, global_mask):
    """Dense masked attention over the whole sequence (the oracle)."""
    mask = cfg.dense_mask(
        q.shape[2], layer=layer, step=step, global_mask=global_mask, n_heads=q.shape[1]
    )
    if padding_mask is not None:
        mask = mask if mask.dim() == 4 else mask.unsqueeze(0)
        mask = mask & ~padding_mask[:, None, None, :]
    return dense_attention(q, k, v, mask)


def _errors(rank, world, case, dtype, layer=1, step=3, batch=2, heads=3, dim=8):
    cfg = SparsityConfig(**case["cfg"]).for_layer(layer, N_LAYERS)
    length = case.get("length", SEQ)  # any length: padded to cp x block, true length passed
    q, k, v, d_out, padding_mask, global_mask = make_inputs(
        case, length, batch, heads, dim, dtype, seed=11
    )
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference(qr, kr, vr, cfg, layer, step, padding_mask, global_mask)
    (ref * d_out).sum().backward()
    q, k, v, d_out, ref_out, dq, dk, dv = (
        pad_for_cp(t.detach(), world, BLOCK)
        for t in (q, k, v, d_out, ref, qr.grad, kr.grad, vr.grad)
    )
    n = q.shape[2] // world
    sl = slice(rank * n, (rank + 1) * n)
    ql, kl, vl = (t[:, :, sl].clone().requires_grad_() for t in (q, k, v))
    out = cp_sparse_attention(
        ql, kl, vl, cfg, None, layer, step, padding_mask=padding_mask, global_mask=global_mask,
        overlap=case.get("overlap", True), seq_len=length,
    )  # fmt: skip
    (out * d_out[:, :, sl]).sum().backward()
    real = max(0, min(n, length - rank * n))  # outputs past the true length are not defined
    pairs = {
        "out": (out[:, :, :real], ref_out[:, :, sl][:, :, :real]),
        "dq": (ql.grad, dq[:, :, sl]),
        "dk": (kl.grad, dk[:, :, sl]),
        "dv": (vl.grad, dv[:, :, sl]),
    }
    if dtype == torch.float32:  # the fused path (FlexAttention runs forward only on CPU)
        with torch.no_grad():
            flex = cp_sparse_attention(
                ql.detach(), kl.detach(), vl.detach(), cfg, None, layer, step,
                padding_mask=padding_mask, global_mask=global_mask, seq_len=length,
                backend="flex",
            )  # fmt: skip
        pairs["flex_out"] = (flex[:, :, :real], ref_out[:, :, sl][:, :, :real])
    return {key: float((a - b).detach().abs().max()) for key, (a, b) in pairs.items()}


def exactness(rank: int, world: int, cases: list[dict], dtypes: list[str]) -> list[dict]:
    """Max errors of this rank's slice for every case and dtype."""
    results = []
    for case in cases:
        for dtype_name in dtypes:
            errs = _errors(rank, world, case, getattr(torch, dtype_name))
            results.append(dict(name=case["name"], dtype=dtype_name, errors=errs))
    return results


def two_layers(rank: int, world: int) -> dict:
    """Two chained cp layers in one graph (the second's queries are the first's output):
    backward crosses two exchange chains without deadlock and stays exact."""
    cfg = SparsityConfig(block_size=BLOCK, window_blocks=7, global_blocks=2, random_blocks=2)
    case = dict(padding=True, sample_global=True)
    q, k, v, d_out, pad, glob = make_inputs(case, SEQ, 2, 2, 8, torch.float64, seed=3)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    h = reference(qr, kr, vr, cfg, 0, 0, pad, glob)
    ref = reference(h, kr, vr, cfg, 1, 0, pad, glob)
    (ref * d_out).sum().backward()
    n = SEQ // world
    sl = slice(rank * n, (rank + 1) * n)
    ql, kl, vl = (t[:, :, sl].clone().requires_grad_() for t in (q, k, v))
    hl = cp_sparse_attention(ql, kl, vl, cfg, None, 0, 0, pad, glob)
    out = cp_sparse_attention(hl, kl, vl, cfg, None, 1, 0, pad, glob)
    (out * d_out[:, :, sl]).sum().backward()
    return {
        "out": float((out - ref[:, :, sl]).detach().abs().max()),
        "dq": float((ql.grad - qr.grad[:, :, sl]).abs().max()),
        "dk": float((kl.grad - kr.grad[:, :, sl]).abs().max()),
        "dv": float((vl.grad - vr.grad[:, :, sl]).abs().max()),
    }


# Three layers, three patterns: a narrow causal token window (a one-block halo), a dilated one
# reaching past a rank's slice (multi-hop), and BigBird blocks (global rows, random all-to-all).
PER_LAYER = dict(
    block_size=BLOCK,
    window_tokens=6,
    global_blocks=0,
    random_blocks=0,
    causal=True,
    layers=(
        {"layers": 1, "window_tokens": 30, "dilation": (1, 2)},
        {"layers": "2:", "window_tokens": 0, "window_blocks": 2, "global_blocks": 1,
         "random_blocks": 2},
    ),
)  # fmt: skip


def per_layer_model(rank: int, world: int) -> dict:
    """A 3-layer model whose layers differ (PER_LAYER) on `world` cp ranks: the error of this
    rank's logits and their gradient against the one-process model, and the forward bytes it
    sent per layer and kind, with what each layer's own plan says it sends
    (parallel.show.forward_bytes of cfg.for_layer)."""
    from model.sparse import sparse_attention
    from model.transformer import ModelArgs, Transformer
    from parallel.show import forward_bytes
    from parallel.traffic import KINDS

    args = ModelArgs(vocab_size=64, d_model=32, n_layers=N_LAYERS, n_heads=2)
    cfg = SparsityConfig(**PER_LAYER)
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(0))
    reference = Transformer(args, cfg, sparse_attention, seed=1).double()
    ref = reference(tokens, step=2)
    ref_grad = torch.autograd.grad(ref.square().sum(), reference.embed.weight)[0]
    counter = TrafficCounter()
    attend = functools.partial(cp_sparse_attention, group=None, traffic=counter)
    model = Transformer(args, cfg, attend, seed=1).double()
    n = SEQ // world
    sl = slice(rank * n, (rank + 1) * n)
    logits = model(tokens[:, sl], torch.arange(SEQ)[sl].expand(2, -1), step=2)
    grad = torch.autograd.grad(logits.square().sum(), model.embed.weight)[0]
    if world > 1:
        dist.all_reduce(grad)  # each rank's is its tokens' share
    sent, expected = {}, {}
    for layer in range(N_LAYERS):
        sent[layer] = {k: counter.total(kind=k, direction="forward", layer=layer) for k in KINDS}
        expected[layer] = forward_bytes(
            cfg.for_layer(layer, N_LAYERS), SEQ, world, rank, args.n_heads, args.head_dim,
            layer, step=2, bytes_per_value=8, batch=2,
        )  # fmt: skip
    return {
        "logits": float((logits - ref[:, sl]).detach().abs().max()),
        "grad": float((grad - ref_grad).abs().max()),
        "sent": sent,
        "expected": expected,
    }


def traffic(rank: int, world: int, cfg_kwargs: dict, batch: int, heads: int, dim: int) -> dict:
    """Bytes this rank sent, by direction and kind, for one forward + backward."""
    cfg = SparsityConfig(**cfg_kwargs)
    n = SEQ // world
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen).requires_grad_() for _ in range(3))
    counter = TrafficCounter()
    out = cp_sparse_attention(q, k, v, cfg, None, layer=2, traffic=counter)
    out.sum().backward()
    return counter.as_dict() | {"layers": counter.layers()}


def errors(rank: int, world: int) -> dict[str, str]:
    """Calls that must raise ValueError on every rank (returns the messages), then a good
    call proving the group is still usable."""
    messages = {}
    good = SparsityConfig(block_size=BLOCK, window_blocks=3, global_blocks=2, random_blocks=1)
    other = SparsityConfig(block_size=BLOCK, window_blocks=5, global_blocks=2, random_blocks=1)
    x = torch.randn(1, 2, SEQ // world, 8)
    calls = {
        "config-mismatch": lambda: cp_sparse_attention(x, x, x, good if rank else other),
        "seq-mismatch": lambda: cp_sparse_attention(
            *(torch.randn(1, 2, SEQ // world + BLOCK * rank, 8),) * 3, good
        ),
        "indivisible": lambda: cp_sparse_attention(*(torch.randn(1, 2, 12, 8),) * 3, good),
        "one-rank-bad-shape": lambda: cp_sparse_attention(
            x, x if rank != world - 1 else x[:, :1], x, good
        ),
    }
    for name, call in calls.items():
        try:
            call()
            messages[name] = "no error"
        except ValueError as err:
            messages[name] = "ValueError: " + str(err)
    out = cp_sparse_attention(x, x, x, good)
    dist.barrier()
    messages["after"] = f"ok {tuple(out.shape)}"
    return messages


def global_projections(rank: int, world: int) -> list[dict]:
    """Longformer's separate global projections (`global_qkv`): this rank's slice of the
    output and of the gradients of q, k, v and of the global q, k, v, against the dense
    oracle with the same projections, in fp64, bidirectional and causal."""
    results = []
    for causal in (False, True):
        cfg = SparsityConfig(
            block_size=BLOCK, window_blocks=3, global_blocks=1, random_blocks=1, causal=causal,
            global_tokens=(37,), seed=5,
        )  # fmt: skip
        case = dict(padding=True, sample_global=True)
        q, k, v, d_out, pad, marks = make_inputs(case, SEQ, 2, 2, 8, torch.float64, seed=4)
        gen = torch.Generator().manual_seed(9)
        qg, kg, vg = (torch.randn(q.shape, generator=gen, dtype=torch.float64) for _ in range(3))
        full = [t.clone().requires_grad_() for t in (q, k, v, qg, kg, vg)]
        ref = reference_attention(*full[:3], cfg, 1, 2, pad, marks, global_qkv=tuple(full[3:]))
        (ref * d_out).sum().backward()
        n = SEQ // world
        sl = slice(rank * n, (rank + 1) * n)
        local = [t[:, :, sl].clone().requires_grad_() for t in (q, k, v, qg, kg, vg)]
        out = cp_sparse_attention(
            *local[:3], cfg, None, 1, 2, pad, marks, global_qkv=tuple(local[3:])
        )
        (out * d_out[:, :, sl]).sum().backward()
        errors = {"out": float((out - ref[:, :, sl]).detach().abs().max())}
        for name, mine, whole in zip(("q", "k", "v", "qg", "kg", "vg"), local, full, strict=True):
            assert mine.grad is not None and whole.grad is not None
            errors["d" + name] = float((mine.grad - whole.grad[:, :, sl]).abs().max())
        results.append(dict(causal=causal, errors=errors))
    return results
