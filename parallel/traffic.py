"""Bytes a rank sends, by kind of exchange, direction and layer.

    from parallel.traffic import TrafficCounter
    traffic = TrafficCounter()
    out = cp_sparse_attention(q, k, v, cfg, group, layer=3, traffic=traffic)
    traffic.total(kind="halo", direction="forward")   # bytes this rank sent
    traffic.as_dict()                                  # {"forward": {"halo": ...}, ...}
    traffic.seconds_by_kind()                          # {"halo": s, ...} blocked in exchanges
    with traffic.paused(): ...                         # e.g. validation: not counted

Kinds: "halo" (window reach, P2P), "random" (random key blocks drawn from the whole sequence,
all-to-all; O(N/P)), "pool" (the random-block pool of `attention.random_pool_blocks`, the same
all-to-all; flat in N), "global" (global
query/key/value rows, all-reduce), "global_merge" (partial outputs of the global queries,
all-reduce).
Point-to-point and all-to-all count the bytes of every message to another rank. Collectives
count what a bandwidth-optimal ring sends per rank: all-reduce 2 (P-1)/P of the buffer,
all-gather (P-1)/P of the gathered result. The counter is a plain accumulator (no
communication); sum it over ranks yourself if you want the group total.
Seconds are the wall time this rank was blocked in an exchange (parallel/cp_comm.py): the
collective calls and, for the overlapped halo, the wait after the interior compute (only the
part the overlap did not hide). On CUDA, NCCL queues work asynchronously, so these are host-side
times, a lower bound of the transfer time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

KINDS = ("halo", "random", "pool", "global", "global_merge")
DIRECTIONS = ("forward", "backward")


def all_reduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of an `nbytes` buffer."""
    return 2 * (world - 1) * nbytes // world if world > 1 else 0


def all_gather_bytes(total_nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-gather whose result holds `total_nbytes`."""
    return (world - 1) * total_nbytes // world if world > 1 else 0


@dataclass
class TrafficCounter:
    """Accumulates bytes sent by this rank, keyed by (direction, kind, layer)."""

    bytes: dict[tuple[str, str, int], int] = field(default_factory=lambda: defaultdict(int))
    """(direction, kind, layer) -> bytes sent."""
    seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    """(direction, kind) -> seconds this rank was blocked in the exchange."""
    enabled: bool = True
    """False inside `paused()`: nothing is counted."""

    @staticmethod
    def _check(kind: str, direction: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"traffic kind={kind!r} must be one of {KINDS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"traffic direction={direction!r} must be one of {DIRECTIONS}")

    def add(self, kind: str, direction: str, layer: int, nbytes: int) -> None:
        self._check(kind, direction)
        if self.enabled:
            self.bytes[(direction, kind, layer)] += int(nbytes)

    def add_time(self, kind: str, direction: str, seconds: float) -> None:
        self._check(kind, direction)
        if self.enabled:
            self.seconds[(direction, kind)] += seconds

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside (evaluation passes between training steps)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def total(
        self, kind: str | None = None, direction: str | None = None, layer: int | None = None
    ) -> int:
        """Sum over the entries matching every given filter."""
        return sum(
            n
            for (d, k, lay), n in self.bytes.items()
            if (kind is None or k == kind)
            and (direction is None or d == direction)
            and (layer is None or lay == layer)
        )

    def layers(self) -> list[int]:
        return sorted({lay for (_, _, lay) in self.bytes})

    def as_dict(self) -> dict[str, dict[str, int]]:
        """{direction: {kind: bytes summed over layers}} with every kind present."""
        return {d: {k: self.total(kind=k, direction=d) for k in KINDS} for d in DIRECTIONS}

    def seconds_by_kind(self) -> dict[str, float]:
        """{kind: seconds blocked, forward and backward together} with every kind present."""
        return {k: sum(self.seconds.get((d, k), 0.0) for d in DIRECTIONS) for k in KINDS}

    def bytes_by_kind(self) -> dict[str, int]:
        """{kind: bytes sent, forward and backward, all layers} with every kind present."""
        return {k: self.total(kind=k) for k in KINDS}

    def reset(self) -> None:
        self.bytes.clear()
        self.seconds.clear()
