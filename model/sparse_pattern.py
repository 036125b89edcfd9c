"""The attention pattern of the BigBird / Longformer family: one object, the rule written once.

    from model.sparse_pattern import SparsityConfig
    cfg = SparsityConfig(block_size=64, window_blocks=3, global_blocks=2, random_blocks=3)
    mask = cfg.dense_mask(seq_len, layer=0)            # the exact pattern, [heads or 1, seq, seq]
    rows = cfg.random_rows(range(nb), nb, n_heads, layer, step)   # the random draw

The token rule is in model/sparse.py's docstring; `dense_mask` is that rule built directly
(with dense attention, the oracle of every test). The block table of the kernels
(model.sparse_plan), FlexAttention's BlockMask (model.sparse_flex) and the context-parallel
plans (parallel.cp_plan) read their window reach, global blocks and random draw from here.
This module imports no kernel, so that every kernel can import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from model.sparse_layers import layer_values, normalize_layers
from model.sparse_random import draw_rows, pool_blocks

__all__ = ["SparsityConfig"]


def _as_int_tuple(value: object, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise ValueError(f"attention.{name}={value!r} must be an integer or a list of integers")


@dataclass(frozen=True)
class SparsityConfig:
    """The attention pattern. Frozen: one value object shared by every layer and rank."""

    block_size: int = 64
    """Tokens per block; the sequence length (per context-parallel rank too) is a multiple."""
    window_blocks: int = 3
    """Key blocks in the sliding window of a query block: odd for bidirectional (centre and
    (w-1)/2 each side); for causal, the diagonal block and w-1 blocks before it. Not used when
    window_tokens > 0."""
    global_blocks: int = 2
    """ITC global blocks: bidirectional, the first ceil(g/2) and the last floor(g/2) blocks;
    causal, the first g blocks (a visible, still causal, prefix or "sink")."""
    random_blocks: int = 3
    """BigBird random key blocks per non-global query block (0 for Longformer)."""
    causal: bool = False
    """Causal language modelling: no key after its query, and a causal mask on the diagonal."""
    dilation: int | tuple[int, ...] = 1
    """Longformer token-level dilation of the window (reach window*dilation); one value or one
    per head."""
    global_tokens: tuple[int, ...] | None = None
    """Explicit global token positions (ITC), in addition to the global blocks."""
    etc_tokens: int = 0
    """ETC: extra global tokens the model prepends; they occupy positions [0, etc_tokens)."""
    random_per_head: bool = False
    """Draw random blocks per head instead of once per layer."""
    random_pool_blocks: int = 0
    """0: random blocks are drawn from the whole sequence (BigBird); under context parallelism
    a rank then fetches about random_blocks remote blocks per local query block, traffic
    O(N/P). p > 0: each (step, layer[, head]) draws a pool of p blocks (one per 1/p of the
    sequence), the same on every rank, and every query block draws its random blocks from the
    pool; the pool's keys/values travel like the global rows, traffic flat in N. Choose p a
    multiple of the cp degree so every rank sends the same amount."""
    seed: int = 0
    """Seed of the random-block draw, combined with step and layer (and head)."""
    global_projections: bool = False
    """Longformer's separate global projections: the global queries' attention uses its own
    query, key and value projections (HF LongformerSelfAttention's query_global, key_global,
    value_global) over every key; the other queries still see the global tokens through the
    ordinary keys and values. A model parameter set, not part of the token rule."""
    window_tokens: int = 0
    """Token-granular sliding window of w tokens, any block size (0: the block window of
    window_blocks). Bidirectional (Longformer's attention_window, w even): key j is visible to
    query i iff |i - j| <= w/2; causal (Mistral's sliding_window): iff 0 <= i - j < w. With
    dilation d the offset i - j must also be a multiple of d, and the reach is (w/2)*d
    (causal (w-1)*d). The block table covers the band; the kernels trim it token by token."""
    layers: tuple[dict, ...] = ()
    """Per-layer patterns (model/sparse_layers.py): a list of mappings, each a `layers`
    selector (a slice string of range(n_layers) such as "0:6" or "5::6", an integer or a list
    of integers) and any of window_blocks, window_tokens, dilation, global_blocks,
    random_blocks, random_per_head, random_pool_blocks for those layers; applied in order, a
    later entry winning. Empty: every layer has the pattern above. Layer i's pattern is
    `for_layer(i, n_layers)`; a full-attention layer is a window wider than the sequence."""
    _dilations: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("block_size", "window_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"attention.{name}={value!r} must be a positive integer")
        for name in (
            "window_tokens",
            "global_blocks",
            "random_blocks",
            "random_pool_blocks",
            "etc_tokens",
            "seed",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"attention.{name}={value!r} must be a non-negative integer")
        if not isinstance(self.global_projections, bool):
            raise ValueError(
                f"attention.global_projections={self.global_projections!r} must be true or false"
            )
        if not self.causal and self.window_blocks % 2 == 0:
            raise ValueError(
                f"attention.window_blocks={self.window_blocks} must be odd for bidirectional "
                "attention (the centre block and the same number of blocks on each side)"
            )
        if not self.causal and self.window_tokens % 2:
            raise ValueError(
                f"attention.window_tokens={self.window_tokens} must be even for bidirectional "
                "attention: a query sees window_tokens/2 keys on each side and itself "
                "(Longformer's attention_window)"
            )
        dilations = _as_int_tuple(self.dilation, "dilation")
        assert dilations is not None
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"attention.dilation={self.dilation!r} must be integers >= 1")
        object.__setattr__(self, "dilation", dilations[0] if len(dilations) == 1 else dilations)
        object.__setattr__(self, "_dilations", dilations)
        tokens = _as_int_tuple(self.global_tokens, "global_tokens")
        if tokens is not None:
            if any(t < 0 for t in tokens):
                raise ValueError(
                    f"attention.global_tokens={list(tokens)} must hold non-negative positions"
                )
            tokens = tuple(sorted(set(tokens)))
        object.__setattr__(self, "global_tokens", tokens)
        if self.causal and self.etc_tokens:
            raise ValueError(
                f"attention.etc_tokens={self.etc_tokens} cannot be used with causal=true: ETC "
                "tokens attend to every position, which breaks causality; use global_blocks "
                "(a causal visible prefix) instead"
            )
        object.__setattr__(self, "layers", normalize_layers(self, self.layers))

    # ---- per-layer patterns (model/sparse_layers.py) ----------------------------------------

    def for_layer(self, layer: int, n_layers: int) -> SparsityConfig:
        """The plain pattern of layer `layer` of `n_layers` (no `layers` left): this config
        with the `layers` entries selecting that layer applied in order."""
        if not self.layers:
            return self
        return replace(self, layers=(), **layer_values(self.layers, layer, n_layers))

    def check_layers(self, n_layers: int, n_heads: int) -> None:
        """Raise a ValueError naming the key when some layer of `n_layers` has no valid
        pattern for `n_heads` heads (an integer selector out of range, a per-head dilation
        list of the wrong length)."""
        for layer in range(n_layers):
            pattern = self.for_layer(layer, n_layers)
            try:
                pattern.head_dilations(n_heads)
            except ValueError as e:
                where = f"layer {layer} (attention.layers): " if self.layers else ""
                raise ValueError(f"{where}{e}") from e

    # ---- derived geometry -------------------------------------------------------------------

    @property
    def left_blocks(self) -> int:
        """Blocks before its own of the *block* window (window_blocks), undilated."""
        return self.window_blocks - 1 if self.causal else (self.window_blocks - 1) // 2

    @property
    def right_blocks(self) -> int:
        """Blocks after its own of the *block* window (window_blocks), undilated."""
        return 0 if self.causal else (self.window_blocks - 1) // 2

    def head_dilations(self, n_heads: int) -> tuple[int, ...]:
        """One dilation per head; raises when a per-head list does not match `n_heads`."""
        if len(self._dilations) == 1:
            return self._dilations * n_heads
        if len(self._dilations) != n_heads:
            raise ValueError(
                f"attention.dilation has {len(self._dilations)} values but the layer has "
                f"{n_heads} heads; give one value or one per head"
            )
        return self._dilations

    @property
    def max_dilation(self) -> int:
        return max(self._dilations)

    def window_band(self, dilation: int) -> tuple[int, int] | None:
        """The token window's key offsets j - i, [lo, hi] inclusive (only multiples of
        `dilation` inside it are seen), for heads of that dilation; None for a block window."""
        if self.layers:
            raise ValueError(
                "attention.layers gives each layer its own pattern: attend, plan and count "
                "with the pattern of one layer, cfg.for_layer(layer, n_layers)"
            )
        w, d = self.window_tokens, dilation
        if not w:
            return None
        if self.causal:
            return -(w - 1) * d, 0
        return -(w // 2) * d, (w // 2) * d

    def window_reach_blocks(self, dilation: int) -> tuple[int, int]:
        """Blocks before and after its own that a query block's window touches, for heads of
        `dilation`: the block window's left/right blocks x dilation; a token window reaching R
        tokens, ceil(R / block_size). The one source of the block table's window entries, the
        random draw's exclusion and (through reach_blocks) the context-parallel halo."""
        band = self.window_band(dilation)
        if band is None:
            return self.left_blocks * dilation, self.right_blocks * dilation
        b = self.block_size
        return -(band[0] // b), -(-band[1] // b)

    @property
    def reach_blocks(self) -> tuple[int, int]:
        """Blocks a query block's window reaches before and after itself (its widest head):
        the block table's window offsets and the context-parallel halo are this reach."""
        return self.window_reach_blocks(self.max_dilation)

    @property
    def reach_tokens(self) -> tuple[int, int]:
        """Tokens of the blocks a query block reaches before and after itself (reach_blocks)."""
        left, right = self.reach_blocks
        return left * self.block_size, right * self.block_size

    def n_blocks(self, seq_len: int) -> int:
        """Blocks of a `seq_len`-token sequence; the last one may be partial."""
        return -(-seq_len // self.block_size)

    def global_block_ids(self, n_blocks: int) -> list[int]:
        """The ITC global blocks of an `n_blocks`-block sequence (fewer when it is shorter)."""
        if self.causal:
            return list(range(min(self.global_blocks, n_blocks)))
        first = min((self.global_blocks + 1) // 2, n_blocks)
        last = min(self.global_blocks // 2, n_blocks - first)
        return list(range(first)) + list(range(n_blocks - last, n_blocks))

    def global_positions(self, seq_len: int) -> torch.Tensor:
        """Sorted token positions that are global for every sample (ITC blocks, tokens, ETC);
        positions past the end of a short sequence are not part of it."""
        b = self.block_size
        flags = torch.zeros(seq_len, dtype=torch.bool)
        for block in self.global_block_ids(self.n_blocks(seq_len)):
            flags[block * b : (block + 1) * b] = True
        if self.global_tokens:
            flags[[t for t in self.global_tokens if t < seq_len]] = True
        flags[: self.etc_tokens] = True
        return flags.nonzero().flatten()

    def validate_seq_len(self, seq_len: int) -> None:
        """Raise a ValueError when `seq_len` is not a sequence length. Any positive length
        works: the last block may be partial, and a window, a global set or an explicit global
        position that does not fit a short sequence is clipped to it (as HF BigBird and
        Longformer accept any length)."""
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
            raise ValueError(f"sequence length {seq_len!r} must be a positive integer")

    # ---- the random draw (model/sparse_random.py) -------------------------------------------

    def draw_seed(self, step: int, layer: int, head: int, what: str = "random-blocks") -> int:
        key = f"halotron-{what}:{self.seed}:{step}:{layer}:{head}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def draw_heads(self, n_heads: int) -> list[tuple[int, int]]:
        """(head, dilation) of each independent draw: one per head with `random_per_head`,
        else one for the layer (head 0) with the widest dilation."""
        dilations = self.head_dilations(n_heads)
        if self.random_per_head:
            return list(enumerate(dilations))
        return [(0, max(dilations))]

    def random_candidates(self, n_blocks: int) -> torch.Tensor:
        """Sorted long: the blocks a random draw may pick (every block but the ITC globals)."""
        keep = torch.ones(n_blocks, dtype=torch.bool)
        keep[self.global_block_ids(n_blocks)] = False
        return keep.nonzero().flatten()

    def random_pool(self, n_blocks: int, layer: int = 0, step: int = 0, head: int = 0):
        """Sorted long [<= random_pool_blocks]: the pool the rows of (layer, step, head) draw
        from, the same on every rank; all candidates when random_pool_blocks is 0."""
        candidates = self.random_candidates(n_blocks)
        if self.random_pool_blocks == 0:
            return candidates
        key = self.draw_seed(step, layer, head, "random-pool")
        return pool_blocks(key, candidates, n_blocks, self.random_pool_blocks)

    def random_rows(
        self, rows: torch.Tensor, n_blocks: int, n_heads: int, layer: int = 0, step: int = 0
    ) -> torch.Tensor:
        """Random key blocks of the query blocks `rows` [nq]: long [1 or heads, nq, r], -1 where
        fewer candidates exist and on global query blocks. O(nq x r + pool): a rank draws
        only the rows it asks for, identically on every rank."""
        rows = rows.to(torch.long)
        r = self.random_blocks
        # Global query blocks see every key already; rows past the sequence are padding.
        skip = torch.ones(n_blocks + 1, dtype=torch.bool)
        skip[:n_blocks] = False
        skip[self.global_block_ids(n_blocks)] = True
        skip_rows = skip[rows.clamp(max=n_blocks)].view(-1, 1)
        tables = []
        for head, dilation in self.draw_heads(n_heads):
            if r == 0:
                tables.append(torch.empty(rows.numel(), 0, dtype=torch.long))
                continue
            # Outside every block the window touches: no block is in the table twice.
            left, right = self.window_reach_blocks(dilation)
            lo = rows - left
            hi = torch.full_like(rows, n_blocks) if self.causal else rows + right
            pool = self.random_pool(n_blocks, layer, step, head)
            picks = draw_rows(self.draw_seed(step, layer, head), rows, pool, lo, hi, r)
            tables.append(picks.masked_fill(skip_rows, -1))
        return torch.stack(tables)

    def random_table(self, seq_len: int, n_heads: int, layer: int = 0, step: int = 0):
        """Random key blocks of every query block: long [1 or heads, n_blocks, random_blocks],
        -1 where fewer candidates exist. Identical on every rank for the same arguments."""
        n_blocks = self.n_blocks(seq_len)
        return self.random_rows(torch.arange(n_blocks), n_blocks, n_heads, layer, step)

    # ---- the oracle -------------------------------------------------------------------------

    def token_rule(
        self,
        seq_len: int,
        n_heads: int,
        layer: int = 0,
        step: int = 0,
        global_mask: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> Callable[..., torch.Tensor]:
        """The rule of model/sparse.py, written once: `allowed(b, h, i, j)` for sample b, head
        h, query token i and key token j, as broadcasting index tensors (FlexAttention's
        mask_mod signature; `dense_mask` evaluates it on grids). Padding is not part of the
        pattern: callers mask padded keys. `global_mask` [batch, seq] adds per-sample
        global tokens (without it b must be 0)."""
        self.validate_seq_len(seq_len)
        b = self.block_size
        rand = self.random_table(seq_len, n_heads, layer, step).expand(n_heads, -1, -1)
        rand = rand.to(device)
        dilations = self.head_dilations(n_heads)
        dil = torch.tensor(dilations, device=device)
        glob = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
        glob[0, self.global_positions(seq_len).to(device)] = True
        if global_mask is not None:
            glob = glob | global_mask.bool().to(device)
        causal, token_window = self.causal, self.window_tokens > 0
        # The window's offsets per head: of tokens (j - i) for a token window, else of blocks.
        bands = [
            self.window_band(d) or (-self.left_blocks * d, self.right_blocks * d) for d in dilations
        ]
        lo = torch.tensor([band[0] for band in bands], device=device)
        hi = torch.tensor([band[1] for band in bands], device=device)

        def allowed(b_idx, h, i, j):
            q_block, kv_block = i // b, j // b
            offset = j - i if token_window else kv_block - q_block
            rule = (offset >= lo[h]) & (offset <= hi[h]) & ((j - i) % dil[h] == 0)
            for r in range(rand.shape[-1]):  # -1 marks no draw and matches no block
                rule = rule | (rand[h, q_block, r] == kv_block)
            rule = rule | glob[b_idx, i] | glob[b_idx, j]
            return rule & (j <= i) if causal else rule

        return allowed

    def dense_mask(
        self,
        seq_len: int,
        layer: int = 0,
        step: int = 0,
        global_mask: torch.Tensor | None = None,
        n_heads: int | None = None,
    ) -> torch.Tensor:
        """The exact pattern as a dense bool mask [heads or 1, seq, seq] (True = attend), or
        [batch, heads or 1, seq, seq] with a per-sample `global_mask` [batch, seq]. O(seq^2):
        for tests and pictures only."""
        per_head = len(self._dilations) > 1 or self.random_per_head
        if n_heads is None:
            n_heads = len(self._dilations) if len(self._dilations) > 1 else 1
        heads = n_heads if per_head else 1
        allowed = self.token_rule(seq_len, n_heads, layer, step, global_mask)
        batch = 1 if global_mask is None else global_mask.shape[0]
        pos = torch.arange(seq_len)
        mask = allowed(
            torch.arange(batch).view(-1, 1, 1, 1),
            torch.arange(heads).view(1, -1, 1, 1),
            pos.view(1, 1, -1, 1),
            pos.view(1, 1, 1, -1),
        )  # [batch, heads, seq, seq]
        return mask[0] if global_mask is None else mask
