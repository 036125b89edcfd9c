"""Packing documents into fixed-length causal-LM sequences with document boundaries.

The token stream is  doc0 EOS doc1 EOS doc2 EOS ...  and it is cut into windows of seq_len + 1
tokens with a stride of seq_len: window i is stream[i*L : i*L + L + 1], so consecutive windows
share one token and every stream token is an input exactly once and a label exactly once (the
first one excepted). A long document simply continues into the next window.

Per window, ``tokens = w[:-1]`` and ``labels = w[1:]``. The EOS in front of a document starts that
document's segment (it plays the role of BOS): ``doc_ids`` counts segments within the sequence
from 0 and ``position_ids`` restart at 0 at each segment start and at the start of every
sequence, so they are always < seq_len. Padding (only at the end of the validation stream) is a
segment of its own, with ``loss_mask`` 0 wherever the label is padding.

Shape legend: B = micro batch size, L = seq_len.
"""

from __future__ import annotations

import numpy as np
import torch


class Packer:
    """Token buffer that takes whole documents and gives out windows of seq_len + 1 tokens.

    Its state is just the leftover buffer (tokens of documents already taken, not yet emitted).
    """

    def __init__(self, seq_len: int, eos_id: int) -> None:
        self.seq_len = seq_len
        self.eos_id = eos_id
        self._chunks: list[np.ndarray] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, tokens: np.ndarray) -> None:
        """Append one document followed by EOS."""
        self._chunks.append(np.asarray(tokens, dtype=np.int64))
        self._chunks.append(np.array([self.eos_id], dtype=np.int64))
        self._len += len(tokens) + 1

    def windows_ready(self) -> int:
        return max(0, (self._len - 1) // self.seq_len)

    def _buffer(self) -> np.ndarray:
        if len(self._chunks) != 1:
            merged = np.concatenate(self._chunks) if self._chunks else np.empty(0, np.int64)
            self._chunks = [merged]
        return self._chunks[0]

    def pop(self, n: int) -> np.ndarray:
        """[n, L + 1] windows; the last token of each stays as the first of the next."""
        if n > self.windows_ready():
            raise ValueError(f"{n} windows requested, {self.windows_ready()} ready")
        buf = self._buffer()
        step = self.seq_len
        out = np.stack([buf[i * step : i * step + step + 1] for i in range(n)])
        self._chunks = [buf[n * step :]]
        self._len -= n * step
        return out

    def pop_padded(self, n: int, pad_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Like ``pop`` but also drains a final partial window, padding it with ``pad_id``.

        Returns (windows [n, L + 1], valid [n, L + 1] bool), or None if no label is left.
        """
        buf = self._buffer()
        if len(buf) < 2:
            return None
        windows = np.full((n, self.seq_len + 1), pad_id, dtype=np.int64)
        valid = np.zeros((n, self.seq_len + 1), dtype=bool)
        for i in range(n):
            piece = buf[i * self.seq_len : i * self.seq_len + self.seq_len + 1]
            if len(piece) < 2:
                break
            windows[i, : len(piece)] = piece
            valid[i, : len(piece)] = True
        used = min(len(buf) - 1, n * self.seq_len)
        self._chunks = [buf[used:]]
        self._len = len(buf) - used
        return windows, valid

    def state_dict(self) -> dict:
        return {"buffer": torch.from_numpy(self._buffer().copy())}

    def load_state_dict(self, state: dict) -> None:
        buf = torch.as_tensor(state["buffer"], dtype=torch.int64).numpy().copy()
        self._chunks, self._len = [buf], len(buf)


def make_batch(
    windows: np.ndarray, eos_id: int, pad_id: int, valid: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Turn [B, L + 1] windows into the training batch dict (see module docstring)."""
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
