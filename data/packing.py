"""Packing documents into fixed-length sequences with document boundaries.

Every document is followed by EOS; the token stream of a document is ``doc EOS``. Two layouts:

- concatenated (default): the documents' streams are concatenated and cut into windows of
  seq_len + 1 tokens with a stride of seq_len: window i is stream[i*L : i*L + L + 1], so
  consecutive windows share one token and every stream token is an input exactly once and a
  label exactly once (the first one excepted). A long document simply continues into the next
  window.
- ``doc_start_at_boundary``: every document starts a new sequence. A document's stream is cut the
  same way into ceil(n / L) windows (a long document fills consecutive sequences) and the last
  one is padded; nothing of the next document shares a sequence with it.

Per window, ``tokens = w[:-1]`` and ``labels = w[1:]``. The EOS in front of a document starts that
document's segment (it plays the role of BOS): ``doc_ids`` counts segments within the sequence
from 0 and ``position_ids`` restart at 0 at each segment start and at the start of every
sequence, so they are always < seq_len. Padding is a segment of its own, with ``loss_mask`` 0
wherever the label is padding.

The packer knows where the first token it has not handed out yet comes from: ``position()`` is
(the caller's id of that document, offset into the document's stream). Since windows are cut at
fixed strides from there, that position alone fixes everything that follows: it is the packer's
whole resumable state (re-add the document with ``start=offset``).

Shape legend: B = micro batch size, L = seq_len.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch


class Packer:
    """Takes whole documents, gives out [n, L + 1] windows plus their validity (see module doc)."""

    def __init__(
        self, seq_len: int, eos_id: int, pad_id: int = 0, doc_start_at_boundary: bool = False
    ) -> None:
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.boundary = doc_start_at_boundary
        # One entry per document: [doc id, its stream from `origin` on (doc EOS, padded in
        # boundary mode), offset in it of the first token not handed out, number of real
        # (non-padding) tokens, origin = tokens of the document handed out before it was added].
        self._segments: deque[list[Any]] = deque()
        self._tokens = 0  # concatenated mode: tokens not handed out yet
        self._windows = 0  # boundary mode: windows not handed out yet

    def add(self, tokens: np.ndarray, doc_id: Any = None, start: int = 0) -> None:
        """Append one document (and its EOS); ``start`` tokens of its stream were handed out."""
        n = len(tokens)
        if not 0 <= start <= n:
            raise ValueError(f"start={start} is outside the {n + 1}-token document stream")
        stream = np.empty(n + 1 - start, dtype=np.int64)
        stream[: n - start] = tokens[start:]
        stream[-1] = self.eos_id
        if self.boundary:
            # Windows are cut from `start` (a window start unless seq_len changed on resume).
            n_windows = -(-(len(stream) - 1) // self.seq_len)
            if n_windows == 0:
                return  # only the EOS is left: no label to give
            padded = np.full(n_windows * self.seq_len + 1, self.pad_id, dtype=np.int64)
            padded[: len(stream)] = stream
            self._segments.append([doc_id, padded, 0, len(stream), start])
            self._windows += n_windows
        else:
            self._segments.append([doc_id, stream, 0, len(stream), start])
            self._tokens += len(stream)

    def windows_ready(self) -> int:
        if self.boundary:
            return self._windows
        return max(0, (self._tokens - 1) // self.seq_len)

    def position(self) -> tuple[Any, int] | None:
        """(doc id, offset) of the first token not handed out yet; None if the packer is empty."""
        if not self._segments:
            return None
        doc_id, _, offset, _, origin = self._segments[0]
        return doc_id, origin + offset

    def pop(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(windows [n, L + 1] int64, valid [n, L + 1] bool)."""
        if n > self.windows_ready():
            raise ValueError(f"{n} windows requested, {self.windows_ready()} ready")
        if self.boundary:
            return self._pop_boundary(n)
        l1 = self.seq_len + 1
        need = n * self.seq_len + 1
        pieces, got = [], 0
        for _, stream, offset, _, _ in self._segments:
            piece = stream[offset : offset + need - got]
            pieces.append(piece)
            got += len(piece)
            if got == need:
                break
        buf = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        windows = np.lib.stride_tricks.sliding_window_view(buf, l1)[:: self.seq_len][:n].copy()
        self._advance(n * self.seq_len)
        return windows, np.ones_like(windows, dtype=bool)

    def _advance(self, count: int) -> None:
        self._tokens -= count
        while count:
            seg = self._segments[0]
            avail = len(seg[1]) - seg[2]
            if avail <= count:
                self._segments.popleft()
                count -= avail
            else:
                seg[2] += count
                count = 0

    def _pop_boundary(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        l1, step = self.seq_len + 1, self.seq_len
        windows = np.empty((n, l1), dtype=np.int64)
        valid = np.empty((n, l1), dtype=bool)
        idx = np.arange(l1)
        for i in range(n):
            seg = self._segments[0]
            _, stream, offset, n_real, _ = seg
            windows[i] = stream[offset : offset + l1]
            valid[i] = offset + idx < n_real
            seg[2] += step
            if seg[2] + 1 >= len(stream):
                self._segments.popleft()
        self._windows -= n
        return windows, valid

    def pop_padded(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Like ``pop`` but also drains a final partial batch, padding it.

        Returns (windows [n, L + 1], valid [n, L + 1] bool), or None if no label is left.
        """
        if self.boundary:
            k = min(n, self.windows_ready())
            if k == 0:
                return None
            windows = np.full((n, self.seq_len + 1), self.pad_id, dtype=np.int64)
            valid = np.zeros((n, self.seq_len + 1), dtype=bool)
            windows[:k], valid[:k] = self._pop_boundary(k)
            return windows, valid
        pieces = [seg[1][seg[2] :] for seg in self._segments]
        buf = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
        if len(buf) < 2:
            return None
        windows = np.full((n, self.seq_len + 1), self.pad_id, dtype=np.int64)
        valid = np.zeros((n, self.seq_len + 1), dtype=bool)
        for i in range(n):
            piece = buf[i * self.seq_len : i * self.seq_len + self.seq_len + 1]
            if len(piece) < 2:
                break
            windows[i, : len(piece)] = piece
            valid[i, : len(piece)] = True
        self._advance(min(len(buf) - 1, n * self.seq_len))
        return windows, valid


def make_batch(
    windows: np.ndarray, eos_id: int, pad_id: int, valid: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Turn [B, L + 1] windows into the causal-LM batch dict (see module docstring)."""
    b, l1 = windows.shape
    if valid is None:
        valid = np.ones((b, l1), dtype=bool)
    tokens, labels = windows[:, :-1], windows[:, 1:]
    tok_valid = valid[:, :-1]
    # A segment starts at every EOS and at the first padding position.
    pad_start = ~tok_valid & np.concatenate([np.ones((b, 1), bool), tok_valid[:, :-1]], axis=1)
    starts = (tokens == eos_id) & tok_valid | pad_start
    doc_ids = np.cumsum(starts, axis=1) - starts[:, :1]
    idx = np.broadcast_to(np.arange(l1 - 1), (b, l1 - 1))
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    position_ids = idx - last_start
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
        "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        "loss_mask": torch.from_numpy(valid[:, 1:].astype(np.float32)),
        "doc_ids": torch.from_numpy(doc_ids.astype(np.int64)),
        "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
    }


def reserve_etc_slots(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """``batch`` [B, L] with ``n`` slots put in front ([B, n + L]) for the model's learned ETC
    tokens (attention.etc_tokens): token ids -1 ... -n (the model writes its own vectors there,
    model.transformer), positions 0 ... n-1, no label and no loss; never global-marked (the
    pattern makes positions [0, n) global itself). ``n`` = 0 returns ``batch``."""
    if n == 0:
        return batch
    b = batch["tokens"].shape[0]
    slots = torch.arange(n).expand(b, n)
    front = {
        "tokens": -1 - slots,
        "labels": torch.full((b, n), -100, dtype=torch.long),
        "loss_mask": torch.zeros(b, n, dtype=batch["loss_mask"].dtype),
        "doc_ids": torch.full((b, n), -1, dtype=torch.long),
        "position_ids": slots,
        "global_mask": torch.zeros(b, n, dtype=torch.bool),
    }
    return {
        key: torch.cat([front[key].to(value.dtype), value], dim=1) if key in front else value
        for key, value in batch.items()
    }
