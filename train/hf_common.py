"""What every Hugging Face converter shares: the Converter seam and HF directories on disk.

    from train.hf_common import read_hf_config, read_hf_weights, write_hf_tokenizer
    config = read_hf_config("path/to/hf_model")          # config.json as a dict
    tensors = read_hf_weights("path/to/hf_model")        # {HF parameter name: tensor}
    write_hf_tokenizer("artifacts/data/stdlib/tokenizer.model", "out/")   # AutoTokenizer loads it

A converter (train/hf_llama.py; BigBird, Longformer and RoBERTa join it) turns one HF
architecture into halotron's config values and parameter names and back; `python -m train.hf`
(train/hf.py) picks it by the HF `config.model_type`. Nothing here knows an architecture.
Reading needs torch and safetensors; writing the tokenizer needs transformers (>= 5: it builds
a fast tokenizer from the sentencepiece model's own settings, and the written tokenizer is
checked to give the sentencepiece ids).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from model.sparse_pattern import SparsityConfig
    from train.config import Config

__all__ = [
    "Converter", "HfState", "read_hf_config", "read_hf_weights", "write_hf_tokenizer",
    "TOKENIZER_CHECK_TEXT", "covers", "uncovered_layers",
]  # fmt: skip

log = logging.getLogger(__name__)

HfState = tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]
"""What a converter reads from an HF directory: (model overrides, attention overrides, state
dict in halotron's parameter names)."""

TOKENIZER_CHECK_TEXT = (
    "def f(x):\n    return {'héllo': x ** 2}  # 日本語 ✓\n\n\tclass  A:  pass\r\n"
)
"""Code, indentation runs, a tab, a carriage return and characters left to byte fallback: the
text on which the written HF tokenizer must give the sentencepiece ids."""


class Converter(Protocol):
    """One HF architecture <-> halotron, registered in train.hf.CONVERTERS by model_type."""

    model_type: str
    """The HF `config.model_type` this converter reads ("llama")."""
    arch: str
    """The halotron `model.arch` it produces and exports ("transformer")."""

    def from_hf(self, hf_dir: Path) -> HfState:
        """(model overrides, attention overrides, state dict in halotron's names) of the HF
        model in `hf_dir`; ValueError naming the HF config key of what cannot be converted
        exactly."""
        ...

    def to_hf(self, cfg: Config, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write the run's weights (`state_dict`, the single-process model's) as an HF model
        directory that transformers' `from_pretrained` loads; ValueError for a run this
        architecture cannot express."""
        ...


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF model directory; FileNotFoundError when it is missing."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {hf_dir} a Hugging Face model directory?")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


_WEIGHTS = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the HF model in `hf_dir` (safetensors or torch .bin, one file or sharded
    with an index), on the CPU in its stored dtype."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    for name, indexed in _WEIGHTS:
        path = hf_dir / name
        if not path.is_file():
            continue
        files = [path]
        if indexed:
            weight_map = json.loads(path.read_text())["weight_map"]
            files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            if file.suffix == ".safetensors":
                tensors.update(load_file(str(file)))
            else:
                tensors.update(torch.load(file, map_location="cpu", weights_only=True))
        return tensors
    raise FileNotFoundError(
        f"{hf_dir} holds no model weights (none of {', '.join(n for n, _ in _WEIGHTS)})"
    )


def write_hf_tokenizer(model_file: str | Path, out_dir: str | Path) -> None:
    """The sentencepiece model `model_file` as an HF fast tokenizer in `out_dir` (tokenizer.json,
    tokenizer_config.json and the .model itself): AutoTokenizer.from_pretrained(out_dir)
    encodes a text to the ids sentencepiece gives, with no special token added (halotron
    starts a document with the end-of-document id: prepend it yourself). Checked on
    TOKENIZER_CHECK_TEXT; ValueError when this transformers cannot reproduce the ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from data.tokenizer import Tokenizer

    sp = Tokenizer.load(model_file)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        try:
            # A directory holding only tokenizer.model: transformers builds the fast tokenizer
            # from the sentencepiece model's own normalizer settings (no dummy prefix here).
            hf_tok = PreTrainedTokenizerFast.from_pretrained(
                tmp,
                unk_token=sp.id_to_piece(sp.unk_id),
                bos_token=sp.id_to_piece(sp.bos_id),
                eos_token=sp.id_to_piece(sp.eos_id),
                pad_token=sp.id_to_piece(sp.pad_id),
            )
        except Exception as e:  # transformers 4 needs a tokenizer.json here
            raise ValueError(
                f"this transformers cannot build a tokenizer from {model_file} ({e}); "
                "transformers >= 5 can (pip install -U transformers)"
            ) from e
        hf_tok.save_pretrained(out_dir)
    shutil.copy(model_file, out_dir / "tokenizer.model")  # for sentencepiece users
    got = AutoTokenizer.from_pretrained(out_dir).encode(TOKENIZER_CHECK_TEXT)
    want = sp.encode(TOKENIZER_CHECK_TEXT)
    if got != want:
        first = next(
            i for i in range(max(len(got), len(want))) if got[i : i + 1] != want[i : i + 1]
        )
        raise ValueError(
            f"the HF tokenizer written to {out_dir} does not reproduce the sentencepiece ids of "
            f"{model_file} (they differ from token {first} of a test text); use transformers >= 5"
        )


def covers(pattern: SparsityConfig, seq_len: int) -> bool:
    """Whether one layer's `pattern` lets every query see every key its causality allows at
    `seq_len` tokens (then it is dense attention, the HF model's)."""
    if pattern.max_dilation != 1:
        return False
    n = seq_len - 1
    band = pattern.window_band(1)
    if band is not None:
        return -band[0] >= n and (pattern.causal or band[1] >= n)
    left, right = pattern.reach_blocks
    n_blocks = pattern.n_blocks(seq_len) - 1
    return left >= n_blocks and (pattern.causal or right >= n_blocks)


def uncovered_layers(cfg: Config) -> list[int]:
    """The layers whose attention pattern is not full attention at train.seq_len."""
    n_layers, attn = cfg.model.n_layers, cfg.attention
    return [
        i for i in range(n_layers) if not covers(attn.for_layer(i, n_layers), cfg.train.seq_len)
    ]
