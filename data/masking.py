"""BERT-style masked-language-model targets and per-sample global marks for a packed batch.

Of the maskable positions (real tokens that are not special ids: EOS separators and padding are
never masked), each is chosen with probability ``mlm_probability``; a chosen token is replaced by
the mask token 80% of the time, by a uniformly random ordinary token 10% of the time and kept 10%
of the time. Labels hold the original token at chosen positions and IGNORE_INDEX (-100, what
``torch.nn.functional.cross_entropy`` ignores) everywhere else; ``loss_mask`` is 1 exactly at the
chosen positions. The draw comes from the generator passed in, so a stream that seeds it from its
position is resumable without saving generator state.

Global marks (``global_marks``): the per-sample global tokens of the attention pattern, as a
``global_mask`` [B, L] bool entry: the first token of every packed document (the EOS separator
that begins it, where its position ids restart; see data/packing.py) and/or every
occurrence of one tokenizer piece (a CLS or question marker). A marked token sees every key
and is seen by every query (model/sparse.py); under context parallelism the whole [B, L] mask
reaches every rank, so every rank's marks join the global exchange. Marked tokens are never
chosen as MLM targets.

Shape legend: B = micro batch size, L = seq_len.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100
FIRST_ORDINARY_ID = 4  # unk, bos, eos, pad are 0..3 (data/tokenizer.py)


def mlm_batch(
    batch: dict[str, torch.Tensor],
    valid_bl: np.ndarray,
    mask_id: int,
    vocab_size: int,
    probability: float,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Turn a causal batch (see data/packing.py) into an MLM batch on the same tokens.

    ``valid_bl`` marks the real (non-padding) input tokens.
    """
    original = batch["tokens"].numpy()
    maskable = valid_bl & (original >= FIRST_ORDINARY_ID) & (original != mask_id)
    if "global_mask" in batch:
        maskable &= ~batch["global_mask"].numpy()
    chosen = maskable & (rng.random(original.shape) < probability)
    action = rng.random(original.shape)
    random_ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, size=original.shape)
    tokens = original.copy()
    tokens[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    tokens[swap] = random_ids[swap]
    labels = np.where(chosen, original, IGNORE_INDEX)
    return {
        **batch,
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "loss_mask": torch.from_numpy(chosen.astype(np.float32)),
    }


def global_marks(
    batch: dict[str, torch.Tensor], valid_bl: np.ndarray, doc_starts: bool, piece_id: int
) -> dict[str, torch.Tensor]:
    """``batch`` with its ``global_mask`` [B, L]: the first real token of every packed document
    (``doc_starts``) and every occurrence of token ``piece_id`` (-1: none). Unchanged when
    neither is asked for."""
    if not doc_starts and piece_id < 0:
        return batch
    marks = np.zeros(valid_bl.shape, dtype=bool)
    if doc_starts:
        marks |= (batch["position_ids"].numpy() == 0) & valid_bl
    if piece_id >= 0:
        marks |= (batch["tokens"].numpy() == piece_id) & valid_bl
    return {**batch, "global_mask": torch.from_numpy(marks)}
