"""SentencePiece tokenizer: training from an iterator of lines, and a small wrapper to use it.

Settings are chosen for source code, where whitespace is content: identity normalization, no
whitespace collapsing, no dummy prefix, whitespace-only pieces allowed (indentation runs become
single pieces) and byte fallback, so ``decode(encode(text)) == text`` for any text that does not
itself contain the meta symbol U+2581 ("▁", which decodes to a space).

Special ids are fixed: unk=0, bos=1, eos=2, pad=3. Documents are separated by eos when packed.

Try it:  python -m data.tokenizer MODEL_FILE "some text"   (prints pieces and ids)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

logger = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")


@dataclass(frozen=True)
class TokenizerArgs:
    """How the sentencepiece model is trained. Everything here changes the resulting model."""

    vocab_size: int = 4096  # total pieces, including the 4 specials and the 256 byte pieces
    model_type: str = "unigram"  # "unigram" or "bpe" (bpe trains ~10x faster, encodes ~3x slower)
    # Extra pieces that are never split, e.g. ("<mask>", "    "); kept in this order after pad.
    user_defined_symbols: tuple[str, ...] = ()
    # Number of lines sampled (reservoir, shuffle_input_sentence) from the corpus for training:
    # the main knob of training time; 100k lines of stdlib code train a 4096 unigram in ~10 s.
    input_sentence_size: int = 100_000
    max_sentence_length: int = 16384  # bytes; longer training lines are skipped by sentencepiece
    character_coverage: float = 0.9995  # rarer characters are left to byte fallback
    num_threads: int = 2  # trainer threads
    seed: int = 0  # sentencepiece's global random seed (line sampling), for reproducible models

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"tokenizer.model_type={self.model_type!r} must be one of {MODEL_TYPES}"
            )
        min_vocab = 4 + 256 + len(self.user_defined_symbols) + 1
        if self.vocab_size < min_vocab:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} must be >= {min_vocab} "
                "(4 specials + 256 byte-fallback pieces + user symbols + at least one piece)"
            )
        if self.input_sentence_size < 1:
            raise ValueError(
                f"tokenizer.input_sentence_size={self.input_sentence_size} must be >= 1"
            )
        if self.max_sentence_length < 1:
            raise ValueError(
                f"tokenizer.max_sentence_length={self.max_sentence_length} must be >= 1"
            )
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(
                f"tokenizer.character_coverage={self.character_coverage} must be in (0, 1]"
            )
        if self.num_threads < 1:
            raise ValueError(f"tokenizer.num_threads={self.num_threads} must be >= 1")
        for sym in self.user_defined_symbols:
            if not sym:
                raise ValueError("tokenizer.user_defined_symbols must not contain empty strings")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["user_defined_symbols"] = list(self.user_defined_symbols)
        return d


class Tokenizer:
    """A loaded sentencepiece model plus the SHA-256 of its file (to detect vocab mismatches)."""

    def __init__(self, model_bytes: bytes, path: Path | None = None) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        return cls(path.read_bytes(), path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts in sentencepiece's C++ thread pool (-1: all cores)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        # Accept numpy arrays and tensors as well as lists.
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``; unk_id if the vocabulary has no such piece."""
        return self._sp.piece_to_id(piece)

    def __repr__(self) -> str:
        sha = self.sha256[:12]
        return f"Tokenizer(path={self.path}, vocab_size={self.vocab_size}, sha256={sha})"


def train_tokenizer(
    lines: Iterable[str], model_path: str | os.PathLike, args: TokenizerArgs, verbose: bool = False
) -> Tokenizer:
    """Train on ``lines`` (an iterator; sentencepiece samples ``input_sentence_size`` of them).

    The model is built in memory and written atomically to ``model_path``: no temporary
    training files are created anywhere. sentencepiece's C++ log goes to stderr only if
    ``verbose``.
    """
    model_path = Path(model_path)
    spm.set_random_generator_seed(args.seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        byte_fallback=True,
        # Code: keep whitespace exactly, so decoding reproduces indentation and blank space.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=args.character_coverage,
        user_defined_symbols=list(args.user_defined_symbols),
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=args.max_sentence_length,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_threads=args.num_threads,
        minloglevel=0 if verbose else 2,
    )
    model_bytes = buf.getvalue()
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model_bytes)
    os.replace(tmp, model_path)
    tok = Tokenizer(model_bytes, model_path)
    logger.info("trained %s", tok)
    return tok


if __name__ == "__main__":
    tok = Tokenizer.load(sys.argv[1])
    ids = tok.encode(sys.argv[2] if len(sys.argv) > 2 else "def main():\n    return 0\n")
    print(tok)
    print([tok.id_to_piece(i) for i in ids])
    print(ids)
