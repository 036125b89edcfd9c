"""The exchanges of context-parallel sparse attention, as autograd Functions.

Each Function's backward is the reverse exchange, next to its forward:
- `all_reduce_sum`: replicated sum (global rows, merge of global-query partials); backward is
  the same all-reduce of the gradients.
- `random_exchange`: one all-to-all(-v) of the random key blocks; backward sends the gradients
  back with the reverse all-to-all and accumulates them into the owner's k/v gradients.
- `halo_start` / `halo_wait`: non-blocking P2P of the window halo. Forward posts the
  isend/irecv in `halo_start` and waits in `halo_wait`, so interior compute overlaps the
  transfer; backward mirrors it: `halo_wait`'s backward posts the gradient sends, `halo_start`'s
  waits and accumulates, so the interior blocks' backward runs while gradients travel.

Ordering. Collectives must be issued in the same order on every rank, in backward too, where
the autograd engine picks the order. Every Function therefore takes and returns a zero-size
*token*: the exchanges form one chain global -> random -> halo start -> halo wait -> merge, and
their backwards run in exactly the reverse order on every rank, whatever the local graph looks
like. (This also keeps the halo wait in backward after the neighbours' gradient sends are
posted: no rank blocks in a collective while a neighbour waits for its halo gradients.)

Used by parallel/context_parallel.py; not a user entry point.
Legend: B batch, H heads, D head dim, nl local blocks, b block size, S = 2 (k and v).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.cp_plan import HaloPiece, RankPlan
from parallel.traffic import TrafficCounter, all_reduce_bytes

_TAG_HALO_FWD = 4101
_TAG_HALO_BWD = 4102


@dataclass
class CPComm:
    """The cp process group as the exchanges see it, plus the traffic sink."""

    group: dist.ProcessGroup | None
    world: int
    rank: int
    traffic: TrafficCounter | None = None
    layer: int = 0

    @classmethod
    def create(cls, group, traffic: TrafficCounter | None, layer: int) -> CPComm:
        if not dist.is_available() or not dist.is_initialized():
            if group is not None:
                raise ValueError("a cp group was given but torch.distributed is not initialized")
            return cls(None, 1, 0, traffic, layer)
        return cls(group, dist.get_world_size(group), dist.get_rank(group), traffic, layer)

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def count(self, kind: str, direction: str, nbytes: int) -> None:
        if self.traffic is not None and nbytes:
            self.traffic.add(kind, direction, self.layer, nbytes)

    @contextmanager
    def blocked(self, kind: str, direction: str) -> Iterator[None]:
        """Time the body (a blocking collective or wait) into the traffic sink."""
        if self.traffic is None:
            yield
            return
        t0 = time.perf_counter()
        yield
        self.traffic.add_time(kind, direction, time.perf_counter() - t0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def token_grad(ctx, index: int, like: torch.Tensor):
    """The gradient of a Function's token input `index`: empty, or None when not needed."""
    return like.new_zeros(0) if ctx.needs_input_grad[index] else None


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, *parts):  # type: ignore[override]
        ctx.sizes = [part.shape[2] for part in parts]
        # a fresh tensor (also for one part): callers may modify the output in place
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return (token_grad(ctx, 0, grad), *grad.split(ctx.sizes, dim=2))


def attach_token(parts: list[torch.Tensor], token) -> torch.Tensor:
    """The parts [B, H, *, D] concatenated along dim 2, made to depend on the last token of
    the chain: backward then runs every exchange's backward on every rank, even one whose
    received tensors this rank never used (a rank with no boundary block still owes its
    neighbours their halo gradients). Without a token, a single part is returned as is."""
    if token is None:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return _Attach.apply(token, *parts)


# ---- all-reduce ------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: CPComm, kind: str, token, x):  # type: ignore[override]
        ctx.comm, ctx.kind = comm, kind
        y = x.contiguous().clone()
        with comm.blocked(kind, "forward"):
            dist.all_reduce(y, group=comm.group)
        comm.count(kind, "forward", all_reduce_bytes(_nbytes(y), comm.world))
        return y, x.new_zeros(0)

    @staticmethod
    def backward(ctx, dy, _dtoken):  # type: ignore[override]
        g = dy.contiguous().clone()
        with ctx.comm.blocked(ctx.kind, "backward"):
            dist.all_reduce(g, group=ctx.comm.group)
        ctx.comm.count(ctx.kind, "backward", all_reduce_bytes(_nbytes(g), ctx.comm.world))
        return None, None, token_grad(ctx, 2, g), g


def all_reduce_sum(comm: CPComm, kind: str, token, x: torch.Tensor):
    """(sum of x over the group, replicated; next token)."""
    if comm.world == 1:
        return x, token
    return _AllReduceSum.apply(comm, kind, token, x)


# ---- random blocks: all-to-all -------------------------------------------------------------


def _all_to_all(comm: CPComm, x: torch.Tensor, out_splits, in_splits) -> torch.Tensor:
    """all_to_all_single along dim 0 (gloo supports split sizes on CPU)."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=comm.group)
    return out


class _RandomExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: CPComm, plan: RankPlan, block: int, token, k, v):  # type: ignore[override]
        batch, heads, n_local, dim = k.shape
        nl = n_local // block
        send_idx = torch.cat(plan.random_sends).to(k.device)
        send_splits = [int(s.numel()) for s in plan.random_sends]

        def pick(t):
            return t.view(batch, heads, nl, block, dim).index_select(2, send_idx)

        x = torch.stack([pick(k), pick(v)]).movedim(3, 0).contiguous()  # [m_send, S, B, H, b, D]
        with comm.blocked(plan.random_kind, "forward"):
            y = _all_to_all(comm, x, plan.random_sources, send_splits)
        sent_elsewhere = sum(n for r, n in enumerate(send_splits) if r != comm.rank)
        comm.count(plan.random_kind, "forward", sent_elsewhere * _nbytes(x[0]) if x.shape[0] else 0)
        ctx.comm, ctx.plan, ctx.send_splits = comm, plan, send_splits
        ctx.shape = (2, batch, heads, nl, block, dim)
        ctx.save_for_backward(send_idx)
        y = y.movedim(0, 3).reshape(2, batch, heads, -1, dim)  # [S, B, H, m_recv*b, D]
        return y[0].contiguous(), y[1].contiguous(), k.new_zeros(0)

    @staticmethod
    def backward(ctx, drk, drv, _dtoken):  # type: ignore[override]
        (send_idx,) = ctx.saved_tensors
        comm, plan = ctx.comm, ctx.plan
        _, batch, heads, nl, block, dim = ctx.shape
        g = torch.stack([drk, drv]).view(2, batch, heads, -1, block, dim)
        g = g.movedim(3, 0).contiguous()  # [m_recv, S, B, H, b, D]
        with comm.blocked(plan.random_kind, "backward"):
            back = _all_to_all(comm, g, ctx.send_splits, plan.random_sources)
        recv_elsewhere = sum(n for r, n in enumerate(plan.random_sources) if r != comm.rank)
        comm.count(
            plan.random_kind, "backward", recv_elsewhere * _nbytes(g[0]) if g.shape[0] else 0
        )
        dkv = g.new_zeros(ctx.shape)
        dkv.index_add_(3, send_idx, back.movedim(0, 3))
        dkv = dkv.view(2, batch, heads, nl * block, dim)
        return None, None, None, token_grad(ctx, 3, dkv), dkv[0], dkv[1]


def random_exchange(comm: CPComm, plan: RankPlan, block: int, token, k, v):
    """(k, v of plan.random_blocks [B, H, m*b, D]; next token)."""
    return _RandomExchange.apply(comm, plan, block, token, k, v)


# ---- halo: non-blocking P2P --------------------------------------------------------------


@dataclass
class HaloState:
    """What the start/wait pair share: posted requests and their buffers."""

    comm: CPComm
    plan: RankPlan
    block: int
    meta: tuple[int, int, int]
    """(batch, heads, head_dim) of k / v."""
    works: list = field(default_factory=list)
    sent: list[torch.Tensor] = field(default_factory=list)
    received: list[tuple[HaloPiece, torch.Tensor]] = field(default_factory=list)
    grad_works: list = field(default_factory=list)
    grad_sent: list[torch.Tensor] = field(default_factory=list)
    grad_received: list[tuple[HaloPiece, torch.Tensor]] = field(default_factory=list)


def _edge_spans(plan: RankPlan, block: int) -> list[slice]:
    """Where each piece of plan.halo_send lies in the edge buffer (RankPlan.edge_local)."""
    return [
        slice(start, start + (piece.hi - piece.lo) * block)
        for piece, start in zip(plan.halo_send, plan.halo_send_in_edge, strict=True)
    ]


class _HaloStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state: HaloState, token, k, v):  # type: ignore[override]
        comm, plan, b = state.comm, state.plan, state.block
        batch, heads, _, dim = k.shape
        for piece in plan.halo_recv:
            buf = k.new_empty(2, batch, heads, (piece.hi - piece.lo) * b, dim)
            state.works.append(dist.irecv(buf, comm.global_rank(piece.src), tag=_TAG_HALO_FWD))
            state.received.append((piece, buf))
        for piece, span in zip(plan.halo_send, _edge_spans(plan, b), strict=True):
            msg = torch.stack([k[:, :, span], v[:, :, span]])
            state.works.append(dist.isend(msg, comm.global_rank(piece.dst), tag=_TAG_HALO_FWD))
            state.sent.append(msg)
            comm.count("halo", "forward", _nbytes(msg))
        ctx.state, ctx.shape, ctx.dtype, ctx.device = state, (2, *k.shape), k.dtype, k.device
        return k.new_zeros(0)

    @staticmethod
    def backward(ctx, _dtoken):  # type: ignore[override]
        state = ctx.state
        dkv = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)  # the edge's size
        with state.comm.blocked("halo", "backward"):
            for work in state.grad_works:
                work.wait()
        spans = _edge_spans(state.plan, state.block)
        for span, (_, grad) in zip(spans, state.grad_received, strict=True):
            dkv[:, :, :, span] += grad
        state.grad_works.clear()
        state.grad_sent.clear()
        state.grad_received.clear()
        return None, token_grad(ctx, 1, dkv), dkv[0], dkv[1]


class _HaloWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state: HaloState, token):  # type: ignore[override]
        with state.comm.blocked("halo", "forward"):
            for work in state.works:
                work.wait()
        plan = state.plan
        left = [buf for piece, buf in state.received if piece.lo < plan.halo_left[1]]
        right = [buf for piece, buf in state.received if piece.lo >= plan.halo_right[0]]
        state.works.clear()
        state.sent.clear()
        state.received.clear()
        ctx.state = state
        batch, heads, dim = state.meta
        empty = token.new_empty(batch, heads, 0, dim)

        def join(bufs: list[torch.Tensor], i: int) -> torch.Tensor:
            return torch.cat([buf[i] for buf in bufs], dim=2) if bufs else empty.clone()

        out = (join(left, 0), join(left, 1), join(right, 0), join(right, 1))
        return (*out, token.new_zeros(0))

    @staticmethod
    def backward(ctx, dkl, dvl, dkr, dvr, _dtoken):  # type: ignore[override]
        state = ctx.state
        comm, plan, b = state.comm, state.plan, state.block
        batch, heads, _, dim = dkl.shape
        for piece in plan.halo_send:
            buf = dkl.new_empty(2, batch, heads, (piece.hi - piece.lo) * b, dim)
            state.grad_works.append(dist.irecv(buf, comm.global_rank(piece.dst), tag=_TAG_HALO_BWD))
            state.grad_received.append((piece, buf))
        grads = torch.cat([torch.stack([dkl, dvl]), torch.stack([dkr, dvr])], dim=3)
        offset = 0
        for piece in plan.halo_recv:  # received in order: left pieces, then right pieces
            length = (piece.hi - piece.lo) * b
            msg = grads[:, :, :, offset : offset + length].contiguous()
            offset += length
            state.grad_works.append(dist.isend(msg, comm.global_rank(piece.src), tag=_TAG_HALO_BWD))
            state.grad_sent.append(msg)
            comm.count("halo", "backward", _nbytes(msg))
        return None, token_grad(ctx, 1, dkl)


def halo_exchange(comm: CPComm, plan: RankPlan, block: int, token, k, v):
    """Post the halo transfer of the edge k / v [B, H, edge, D] (the local keys at
    plan.edge_local); returns a callable that waits for it and gives
    (k_left, v_left, k_right, v_right [B, H, *, D], next token)."""
    state = HaloState(comm, plan, block, (k.shape[0], k.shape[1], k.shape[3]))
    started = _HaloStart.apply(state, token, k, v)

    def wait():
        return _HaloWait.apply(state, started)

    return wait
