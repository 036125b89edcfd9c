"""Picture of the attention pattern split across context-parallel ranks, with bytes per rank.

    python -m train.show --config configs/demo.yaml --cp 4 --out pattern.png \
        [--seq-len N] [--layer L | --layer all] [--head H] [--step S] [--bytes-per-value 4]

Each cell is one (query block, key block) pair. Query rows belong to the rank that holds the
query block (rank r holds blocks [r*nl, (r+1)*nl)); an attended cell is coloured by where that
rank gets the key block from: its own blocks (local), the window halo from its neighbours, the
global rows (a global key, or a global query whose partial softmax is merged across ranks), or
the all-to-all of remote random blocks. The legend gives the forward bytes each rank sends per
layer and sequence, computed from the plan with parallel/traffic.py's conventions. A pattern
is one layer's (`cfg.for_layer(layer, n_layers)` with attention.layers); `render_layers` draws
every layer's, one panel each.

    from parallel.show import classify_blocks, forward_bytes, draw_pattern
    cats = classify_blocks(cfg.attention, seq_len, world=4, n_heads=4)   # int [nb, nb]
Legend: nb = blocks in the sequence, nl = blocks per rank, b = block size.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np

from model.sparse import SparsityConfig
from parallel.cp_plan import rank_plan
from parallel.traffic import KINDS, all_reduce_bytes

__all__ = [
    "NONE",
    "LOCAL",
    "HALO",
    "GLOBAL",
    "RANDOM",
    "CATEGORY_NAMES",
    "classify_blocks",
    "forward_bytes",
    "describe_pattern",
    "draw_pattern",
    "draw_layers",
    "render_pattern",
    "render_layers",
]

log = logging.getLogger(__name__)

NONE, LOCAL, HALO, GLOBAL, RANDOM = 0, 1, 2, 3, 4
CATEGORY_NAMES = {
    LOCAL: "local",
    HALO: "halo (window, from neighbours)",
    GLOBAL: "global (rows all-reduced)",
    RANDOM: "random (remote, all-to-all)",
}
_COLOURS = {LOCAL: "#2b6cb0", HALO: "#f6ad55", GLOBAL: "#38a169", RANDOM: "#e53e3e"}
_RANK_TINTS = ("#f7fafc", "#e2e8f0")


def _window_offsets_allowed(cfg: SparsityConfig, dilation: int) -> list[int]:
    """Block offsets J - I of the window holding at least one allowed token pair: a token
    offset j - i in [o*b - (b-1), o*b + (b-1)] (and, for a token window, inside its band)
    must be a multiple of the dilation."""
    b = cfg.block_size
    left, right = cfg.window_reach_blocks(dilation)
    band = cfg.window_band(dilation)
    offsets = []
    for o in range(-left, right + 1):
        lo, hi = o * b - (b - 1), o * b + (b - 1)
        if band is not None:
            lo, hi = max(lo, band[0]), min(hi, band[1])
        if (hi // dilation) * dilation >= lo:
            offsets.append(o)
    return offsets


def classify_blocks(
    cfg: SparsityConfig,
    seq_len: int,
    world: int,
    n_heads: int = 1,
    layer: int = 0,
    step: int = 0,
    head: int = 0,
) -> np.ndarray:
    """int [nb, nb]: for query block I (row) and key block J (column), NONE when no token of I
    attends a token of J in head `head`, else where I's rank gets J: LOCAL, HALO, GLOBAL or
    RANDOM. Built from the rules and the cp plan (not from the dense mask, which tests it)."""
    cfg.validate_seq_len(seq_len)
    b = cfg.block_size
    nb = seq_len // b
    if world < 1 or nb % world:
        raise ValueError(f"--cp {world} must divide the {nb} blocks of {seq_len} tokens (b={b})")
    if not 0 <= head < n_heads:
        raise ValueError(f"--head {head} must be in [0, {n_heads})")
    nl = nb // world
    allowed = np.zeros((nb, nb), dtype=bool)
    rows = np.arange(nb)
    dilation = cfg.head_dilations(n_heads)[head]
    for o in _window_offsets_allowed(cfg, dilation):
        keep = (rows + o >= 0) & (rows + o < nb)
        allowed[rows[keep], rows[keep] + o] = True
    table = cfg.random_table(seq_len, n_heads, layer, step).numpy()
    picks = table[head if cfg.random_per_head else 0]  # [nb, r]
    for r in range(picks.shape[1]):
        ok = picks[:, r] >= 0
        allowed[rows[ok], picks[ok, r]] = True
    global_blocks = np.unique(cfg.global_positions(seq_len).numpy() // b)
    allowed[global_blocks, :] = True
    allowed[:, global_blocks] = True
    if cfg.causal:
        allowed &= rows[None, :] <= rows[:, None]

    cats = np.where(allowed, RANDOM, NONE).astype(np.int64)
    is_global = np.zeros(nb, dtype=bool)
    is_global[global_blocks] = True
    for rank in range(world):
        plan = rank_plan(cfg, seq_len, world, rank, n_heads, layer, step)
        q = slice(rank * nl, (rank + 1) * nl)
        block = cats[q]
        cols = rows[None, :]
        in_halo = ((cols >= plan.halo_left[0]) & (cols < plan.halo_left[1])) | (
            (cols >= plan.halo_right[0]) & (cols < plan.halo_right[1])
        )
        glob = is_global[None, :] | is_global[q, None]
        local = (cols >= rank * nl) & (cols < (rank + 1) * nl)
        # Precedence: what the rank already holds, then what the halo brings, then the
        # global rows; only the rest travels in the random all-to-all.
        for mask, cat in ((glob, GLOBAL), (in_halo, HALO), (local, LOCAL)):
            block[(block != NONE) & mask] = cat
        remote = np.flatnonzero((block == RANDOM).any(axis=0))
        wanted = set(plan.random_blocks.tolist())
        if not set(remote.tolist()) <= wanted:
            raise AssertionError(f"rank {rank}: random blocks {remote} outside its plan {wanted}")
    return cats


def forward_bytes(
    cfg: SparsityConfig,
    seq_len: int,
    world: int,
    rank: int,
    n_heads: int,
    head_dim: int,
    layer: int = 0,
    step: int = 0,
    bytes_per_value: int = 4,
    batch: int = 1,
) -> dict[str, int]:
    """Bytes `rank` sends in the forward of one layer, per kind (parallel.traffic.KINDS), as a
    TrafficCounter would count them in cp_sparse_attention (k and v of `n_heads` heads)."""
    plan = rank_plan(cfg, seq_len, world, rank, n_heads, layer, step)
    b = cfg.block_size
    row = batch * n_heads * head_dim * bytes_per_value  # one token of one tensor
    halo = sum(2 * (p.hi - p.lo) * b * row for p in plan.halo_send)
    sent = sum(int(s.numel()) for dst, s in enumerate(plan.random_sends) if dst != rank)
    moved = 2 * sent * b * row if plan.random_in_group else 0
    n_glob = int(cfg.global_positions(seq_len).numel())
    glob = merge = 0
    if n_glob and world > 1:
        glob = all_reduce_bytes(3 * n_glob * row, world)  # q, k, v of the global rows
        # The row max (counted as 8 bytes a value) and the packed [u | l] partials.
        merge = all_reduce_bytes(batch * n_heads * n_glob * 8, world)
        merge += all_reduce_bytes(n_glob * (row + batch * n_heads * bytes_per_value), world)
    out = dict.fromkeys(KINDS, 0) | {"halo": halo, "global": glob, "global_merge": merge}
    out[plan.random_kind] = moved
    assert set(out) == set(KINDS)
    return out


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def describe_pattern(cfg: SparsityConfig) -> str:
    """One line naming a layer's pattern (the pictures' titles)."""
    if cfg.window_tokens:
        window = f"window {cfg.window_tokens} tokens"
    else:
        window = f"window {cfg.window_blocks} blocks"
    if cfg.max_dilation > 1:
        window += f" dilation {cfg.dilation}"
    pool = f" (pool {cfg.random_pool_blocks})" if cfg.random_pool_blocks else ""
    return (
        f"b={cfg.block_size}, {window}, global {cfg.global_blocks}, random "
        f"{cfg.random_blocks}{pool}, {'causal' if cfg.causal else 'bidirectional'}"
    )


def _colours():
    from matplotlib.colors import ListedColormap

    colours = [_RANK_TINTS[1], _RANK_TINTS[0], "white", *[_COLOURS[c] for c in _COLOURS]]
    return ListedColormap(colours), len(colours)


def _draw_panel(ax, cats: np.ndarray, world: int, title: str, labels: bool = True) -> None:
    """One classified pattern `cats` [nb, nb] on the axes `ax`, rank bands marked."""
    nb = cats.shape[0]
    nl = nb // world
    # Unattended cells take their row's rank tint, so the rank bands show through.
    rank_of_row = np.arange(nb) // nl
    image = np.where(cats == NONE, -1 - (rank_of_row[:, None] % 2), cats)
    cmap, n_colours = _colours()
    ax.imshow(image + 2, cmap=cmap, vmin=0, vmax=n_colours - 1, interpolation="nearest")
    for r in range(1, world):
        ax.axhline(r * nl - 0.5, color="black", linewidth=0.8)
        ax.axvline(r * nl - 0.5, color="black", linewidth=0.4, linestyle=":")
    ax.set_yticks([r * nl + nl / 2 - 0.5 for r in range(world)])
    ax.set_yticklabels([f"rank {r}" for r in range(world)])
    if labels:
        ax.set_xlabel("key block")
        ax.set_ylabel("query blocks (rows computed by the rank)")
    ax.set_title(title, fontsize=None if labels else 8)


def _save(fig, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps the outside legend
    plt.close(fig)
    return path


def draw_pattern(
    cats: np.ndarray,
    world: int,
    out: str | Path,
    bytes_by_rank: list[dict[str, int]] | None = None,
    title: str = "",
) -> Path:
    """Write the classified pattern `cats` [nb, nb] as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    side = min(12.0, 4.0 + cats.shape[0] / 24)
    fig, ax = plt.subplots(figsize=(side, side))
    _draw_panel(ax, cats, world, title)
    handles: list = [
        Patch(color=_COLOURS[c], label=f"{CATEGORY_NAMES[c]}: {int((cats == c).sum())} blocks")
        for c in _COLOURS
    ]
    if bytes_by_rank is not None:
        handles.append(Patch(color="white", label="forward bytes sent / layer / sequence:"))
        for r, sent in enumerate(bytes_by_rank):
            parts = ", ".join(f"{k} {_kib(v)}" for k, v in sent.items() if v)
            label = f"rank {r}: {_kib(sum(sent.values()))}" + (f" ({parts})" if parts else "")
            handles.append(Patch(color=_RANK_TINTS[r % 2], label=label))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return _save(fig, out)


def draw_layers(
    panels: list[tuple[np.ndarray, str, list[dict[str, int]]]],
    world: int,
    out: str | Path,
    title: str = "",
) -> Path:
    """Write one panel per layer, (cats [nb, nb], title, forward bytes of each rank), in a
    grid as a PNG, each panel's title ending with the most bytes a rank sends in that layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 5.0 * rows), squeeze=False)
    for ax, (cats, name, sent) in zip(axes.flat, panels, strict=False):
        worst = max(sent, key=lambda by_kind: sum(by_kind.values()))
        parts = ", ".join(f"{k} {_kib(v)}" for k, v in worst.items() if v) or "nothing"
        text = textwrap.fill(f"{name}; most sent by a rank: {parts}", 48)
        _draw_panel(ax, cats, world, text, labels=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    handles = [Patch(color=_COLOURS[c], label=CATEGORY_NAMES[c]) for c in _COLOURS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(title)
    return _save(fig, out)


def render_pattern(
    attn_cfg: SparsityConfig,
    seq_len: int,
    world: int,
    n_heads: int,
    head_dim: int,
    out: str | Path,
    layer: int = 0,
    head: int = 0,
    step: int = 0,
    bytes_per_value: int = 4,
    title: str | None = None,
    cats: np.ndarray | None = None,
) -> Path:
    """classify_blocks + forward_bytes of every rank + draw_pattern: the whole picture (what a
    trainer attaches to its wandb run). `cats` reuses an existing classification."""
    if cats is None:
        cats = classify_blocks(attn_cfg, seq_len, world, n_heads, layer, step, head)
    sent = [
        forward_bytes(attn_cfg, seq_len, world, r, n_heads, head_dim, layer, step, bytes_per_value)
        for r in range(world)
    ]
    if title is None:
        title = f"N={seq_len}, cp={world}, layer {layer}, head {head}"
    return draw_pattern(cats, world, out, sent, title)


def render_layers(
    attn_cfg: SparsityConfig,
    n_layers: int,
    seq_len: int,
    world: int,
    n_heads: int,
    head_dim: int,
    out: str | Path,
    head: int = 0,
    step: int = 0,
    bytes_per_value: int = 4,
    title: str | None = None,
) -> Path:
    """Every layer's own pattern (attention.layers) split over the ranks, one panel each with
    the forward bytes its ranks send: what differs from layer to layer."""
    panels = []
    for layer in range(n_layers):
        cfg = attn_cfg.for_layer(layer, n_layers)
        cats = classify_blocks(cfg, seq_len, world, n_heads, layer, step, head)
        sent = [
            forward_bytes(cfg, seq_len, world, r, n_heads, head_dim, layer, step, bytes_per_value)
            for r in range(world)
        ]
        panels.append((cats, f"layer {layer}: {describe_pattern(cfg)}", sent))
    if title is None:
        title = f"N={seq_len}, cp={world}, head {head}"
    return draw_layers(panels, world, out, title)
