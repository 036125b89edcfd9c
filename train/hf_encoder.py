"""HF RoBERTa / Longformer / BigBird masked-LM checkpoints <-> halotron's encoder
(model/encoder.py), weights exact; RoBERTa -> Longformer by copying the positions out.

    python -m train.hf import --hf-dir path/to/roberta --out runs/rob data.path=... \
        data.objective=mlm                                   # train/hf.py picks by model_type
    python -m train.hf export --checkpoint runs/rob --out hf_rob [--model-type longformer]

The three are one architecture (BERT's post-LN blocks with biases, learned absolute positions,
an MLM head tied to the word embedding); what differs:
- RoBERTa ("roberta", RobertaForMaskedLM): full attention; positions count from
  pad_token_id + 1 (model.position_offset); the MLM head's activation is always erf GELU.
- Longformer ("longformer", LongformerForMaskedLM): RoBERTa plus a token window
  (attention_window = attention.window_tokens: |i - j| <= w / 2; a list, one window per layer,
  is the first layer's window plus attention.layers entries for the others), per-sample global
  tokens (global_attention_mask = the batch's global_mask) and query_global / key_global /
  value_global projections (attention.global_projections).
- BigBird ("big_bird", BigBirdForMaskedLM): positions from 0, hidden_act "gelu_new" (tanh GELU,
  model.mlp=gelu_tanh) in the blocks and the head, a pooler kept for export (model.pooler),
  attention_type "original_full" (full attention) or "block_sparse": block_size, window_blocks
  3, global_blocks 2 (the first and last block), random_blocks = num_random_blocks,
  random_per_head. Given the same random blocks this is HF's training-mode function (the
  tests inject halotron's draw into HF's random table); the draw itself is halotron's, and
  HF's eval mode (every random block is block 0, counted again on top of the global block 0)
  is no pattern. At train.seq_len <= (5 + 2 * num_random_blocks) * block_size HF attends
  fully, and the import gives full attention.
Names: word / position / token_type embeddings and the embedding LayerNorm are embed /
pos_embed / type_embed / embed_norm; per layer, query / key / value are fused into attn.qkv
(rows [q | k | v]; the global ones into attn.qkv_global), attention.output.dense / LayerNorm
are attn.out / attn_norm, intermediate.dense / output.dense / output.LayerNorm are mlp.up /
mlp.down / mlp_norm; the head's dense / LayerNorm / bias / decoder are head.dense / head.norm /
lm_head.bias / lm_head.weight.

RoBERTa -> Longformer (the Longformer paper's recipe): when train.seq_len + position_offset is
more than the checkpoint's max_position_embeddings, the import copies the learned positions
out (rows past the 2 offset rows repeated until seq_len + position_offset rows), makes the
pattern Longformer's (a token window of the checkpoint's length, global_projections with the
global query / key / value copied from the local ones), and the run exports as a Longformer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from train.hf_common import HfState, read_hf_config, read_hf_weights, uncovered_layers

if TYPE_CHECKING:
    from train.config import Config

__all__ = [
    "EncoderConverter", "RobertaConverter", "LongformerConverter", "BigBirdConverter",
    "extend_positions", "requested_seq_len",
]  # fmt: skip

log = logging.getLogger(__name__)

# Per layer: (HF name under {prefix}encoder.layer.{i}., ours under blocks.{i}.)
_LAYER = (
    ("attention.output.dense", "attn.out"),
    ("attention.output.LayerNorm", "attn_norm"),
    ("intermediate.dense", "mlp.up"),
    ("output.dense", "mlp.down"),
    ("output.LayerNorm", "mlp_norm"),
)
_EMBED = (
    ("embeddings.word_embeddings.weight", "embed.weight"),
    ("embeddings.position_embeddings.weight", "pos_embed.weight"),
    ("embeddings.token_type_embeddings.weight", "type_embed.weight"),
    ("embeddings.LayerNorm.weight", "embed_norm.weight"),
    ("embeddings.LayerNorm.bias", "embed_norm.bias"),
)
_WB = ("weight", "bias")


def requested_seq_len(recipe: str | Path | None, overrides: list[str]) -> int:
    """train.seq_len that the import's recipe and overrides give (the default otherwise)."""
    from train.config import TrainArgs, parse_overrides, read_yaml

    given = parse_overrides(overrides).get("train", {})
    if "seq_len" in given:
        return int(given["seq_len"])
    written = (read_yaml(recipe) or {}) if recipe is not None else {}
    train = written.get("train") if isinstance(written, dict) else None
    if isinstance(train, dict) and "seq_len" in train:
        return int(train["seq_len"])
    return TrainArgs().seq_len


def extend_positions(pos_pc: torch.Tensor, offset: int, rows: int) -> torch.Tensor:
    """The position embedding [p, c] with `rows` rows: the `offset` first rows kept, the
    learned ones after them repeated in order (the Longformer paper's copy)."""
    learned = pos_pc[offset:]
    reps = -(-(rows - offset) // learned.shape[0])
    return torch.cat([pos_pc[:offset], learned.repeat(reps, 1)[: rows - offset]])


class EncoderConverter:
    """What the three converters share; subclasses give the names and the config keys."""

    model_type = ""
    arch = "encoder"
    prefix = ""
    head = {"dense": "lm_head.dense", "norm": "lm_head.layer_norm", "bias": "lm_head.bias",
            "decoder": "lm_head.decoder"}  # fmt: skip
    pooler = ""
    global_projections = False

    # ---- HF -> halotron -----------------------------------------------------------------

    def refusal(self, config: dict[str, Any]) -> str | None:
        if config.get("position_embedding_type", "absolute") != "absolute":
            return f"position_embedding_type={config['position_embedding_type']!r}"
        if config.get("is_decoder") or config.get("add_cross_attention"):
            return "is_decoder / add_cross_attention: halotron's encoder has no cross-attention"
        return None

    def model_values(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "vocab_size": config["vocab_size"],
            "d_model": config["hidden_size"],
            "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "ffn_hidden": config["intermediate_size"],
            "norm_eps": float(config.get("layer_norm_eps", 1e-12)),
            "max_positions": config["max_position_embeddings"],
            "type_vocab_size": config.get("type_vocab_size", 2),
            "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        }

    def attention_values(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"causal": False}

    def from_hf(self, hf_dir: Path) -> HfState:
        config = read_hf_config(hf_dir)
        reason = self.refusal(config)
        if reason is not None:
            raise ValueError(f"cannot convert {hf_dir} exactly: config.json has {reason}")
        model = self.model_values(config)
        tensors = read_hf_weights(hf_dir)
        model["pooler"] = bool(self.pooler) and f"{self.prefix}{self.pooler}.weight" in tensors
        state = self.to_halotron(tensors, model)
        return model, self.attention_values(config), state

    def to_halotron(
        self, tensors: dict[str, torch.Tensor], model: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        hf = dict(tensors)
        p = self.prefix

        def take(name: str) -> torch.Tensor:
            if name not in hf:
                raise ValueError(f"the HF weights have no tensor {name!r}")
            return hf.pop(name).float()

        out = {ours: take(p + theirs) for theirs, ours in _EMBED}
        for i in range(model["n_layers"]):
            src, dst = f"{p}encoder.layer.{i}.", f"blocks.{i}."
            for wb in _WB:
                qkv = [take(f"{src}attention.self.{n}.{wb}") for n in ("query", "key", "value")]
                out[f"{dst}attn.qkv.{wb}"] = torch.cat(qkv)
                if self.global_projections:
                    names = ("query_global", "key_global", "value_global")
                    glob = [take(f"{src}attention.self.{n}.{wb}") for n in names]
                    out[f"{dst}attn.qkv_global.{wb}"] = torch.cat(glob)
            for theirs, ours in _LAYER:
                for wb in _WB:
                    out[f"{dst}{ours}.{wb}"] = take(f"{src}{theirs}.{wb}")
        for wb in _WB:
            out[f"head.dense.{wb}"] = take(f"{self.head['dense']}.{wb}")
            out[f"head.norm.{wb}"] = take(f"{self.head['norm']}.{wb}")
        out["lm_head.bias"] = take(self.head["bias"])
        hf.pop(self.head["decoder"] + ".bias", None)  # the same tensor as the head's bias
        if model["tie_embeddings"]:
            hf.pop(self.head["decoder"] + ".weight", None)  # some tied checkpoints store it
            out["lm_head.weight"] = out["embed.weight"]
        else:
            out["lm_head.weight"] = take(self.head["decoder"] + ".weight")
        if model["pooler"]:
            for wb in _WB:
                out[f"pooler.{wb}"] = take(f"{p}{self.pooler}.{wb}")
        # Buffers of older checkpoints, and a pooler the MLM model has no place for.
        dropped = [k for k in hf if "pooler" in k]
        if dropped:
            log.info("dropping %s: the MLM logits do not use the pooler", ", ".join(dropped))
        left = sorted(k for k in hf if not k.endswith(("position_ids", "token_type_ids")))
        left = [k for k in left if k not in dropped]
        if left:
            raise ValueError(
                f"the HF weights hold tensors the encoder has no place for: {', '.join(left[:5])}"
            )
        return out

    def fit_to(
        self, model: dict[str, Any], attention: dict[str, Any], state: dict, seq_len: int
    ) -> HfState:
        """The import for `seq_len`-token sequences: unchanged unless a subclass extends."""
        return model, attention, state

    # ---- halotron -> HF -----------------------------------------------------------------

    def accepts(self, cfg: Config) -> bool:
        """Whether this converter is the natural export of the run (train.hf.export_hf)."""
        return False

    def exports_pattern(self, cfg: Config) -> bool:
        """Whether the HF model written for the run attends with the run's sparse pattern
        (else it attends fully: train.hf.export_hf warns when the run is sparse)."""
        return False

    def hf_config(self, cfg: Config) -> Any:
        raise NotImplementedError

    def check_run(self, cfg: Config) -> None:
        m = cfg.model
        if m.arch != self.arch:
            raise ValueError(
                f"this run cannot be written as {self.model_type}: model.arch={m.arch!r}"
            )

    def to_hf_state(self, cfg: Config, state_dict: dict[str, torch.Tensor]) -> dict:
        m, p = cfg.model, self.prefix
        out = {p + theirs: state_dict[ours] for theirs, ours in _EMBED if ours in state_dict}
        if m.type_vocab_size == 0:  # HF always adds a token type row: a zero one
            out[p + "embeddings.token_type_embeddings.weight"] = torch.zeros(1, m.d_model)
        for i in range(m.n_layers):
            src, dst = f"blocks.{i}.", f"{p}encoder.layer.{i}."
            for wb in _WB:
                q, k, v = state_dict[f"{src}attn.qkv.{wb}"].chunk(3)
                for n, t in zip(("query", "key", "value"), (q, k, v), strict=True):
                    out[f"{dst}attention.self.{n}.{wb}"] = t
                if self.global_projections:
                    # Without global projections the global rows use the local ones: copies.
                    name = f"{src}attn.qkv_global.{wb}"
                    glob = state_dict.get(name, state_dict[f"{src}attn.qkv.{wb}"]).chunk(3)
                    names = ("query_global", "key_global", "value_global")
                    for n, t in zip(names, glob, strict=True):
                        out[f"{dst}attention.self.{n}.{wb}"] = t
            for theirs, ours in _LAYER:
                for wb in _WB:
                    out[f"{dst}{theirs}.{wb}"] = state_dict[f"{src}{ours}.{wb}"]
        for wb in _WB:
            out[f"{self.head['dense']}.{wb}"] = state_dict[f"head.dense.{wb}"]
            out[f"{self.head['norm']}.{wb}"] = state_dict[f"head.norm.{wb}"]
        out[self.head["bias"]] = state_dict["lm_head.bias"]
        out[self.head["decoder"] + ".bias"] = state_dict["lm_head.bias"]
        out[self.head["decoder"] + ".weight"] = state_dict["lm_head.weight"]
        if self.pooler:
            for wb in _WB:
                fallback = torch.zeros_like(state_dict[f"head.dense.{wb}"])
                out[f"{p}{self.pooler}.{wb}"] = state_dict.get(f"pooler.{wb}", fallback)
        return {name: t.contiguous() for name, t in out.items()}

    def to_hf(self, cfg: Config, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        from transformers import AutoModelForMaskedLM

        self.check_run(cfg)
        model = AutoModelForMaskedLM.from_config(self.hf_config(cfg))
        model.load_state_dict(self.to_hf_state(cfg, state_dict), strict=True)
        model.save_pretrained(out_dir)


class RobertaConverter(EncoderConverter):
    """RobertaForMaskedLM ("roberta"): full attention; RoBERTa -> Longformer in fit_to."""

    model_type = "roberta"
    prefix = "roberta."
    pooler = ""  # RobertaForMaskedLM has none: a stored roberta.pooler is dropped

    def refusal(self, config: dict[str, Any]) -> str | None:
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            return f"hidden_act={act!r}: the RoBERTa MLM head is erf GELU, as must be the blocks"
        return super().refusal(config)

    def model_values(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            **super().model_values(config),
            "mlp": "gelu",
            "position_offset": config.get("pad_token_id", 1) + 1,
        }

    def fit_to(self, model, attention, state, seq_len):
        offset, rows = model["position_offset"], model["max_positions"]
        if seq_len + offset <= rows:
            return model, attention, state
        window = rows - offset - (rows - offset) % 2
        log.info(
            "train.seq_len=%d is longer than the checkpoint's %d positions: importing it as a "
            "Longformer (positions copied out to %d rows, a %d-token window, global projections "
            "copied from the local ones)", seq_len, rows - offset, seq_len + offset, window,
        )  # fmt: skip
        state = dict(state)
        state["pos_embed.weight"] = extend_positions(state["pos_embed.weight"], offset,
                                                     seq_len + offset)  # fmt: skip
        for i in range(model["n_layers"]):
            for wb in _WB:
                local = state[f"blocks.{i}.attn.qkv.{wb}"]
                state[f"blocks.{i}.attn.qkv_global.{wb}"] = local.clone()
        model = {**model, "max_positions": seq_len + offset}
        attention = {**LongformerConverter.pattern(window), **attention}
        return model, attention, state

    def accepts(self, cfg: Config) -> bool:
        return (
            cfg.model.position_offset > 0
            and not cfg.attention.global_projections
            and not uncovered_layers(cfg)
        )

    def check_run(self, cfg: Config) -> None:
        super().check_run(cfg)
        _check_roberta_like(self.model_type, cfg)

    def hf_config(self, cfg: Config) -> Any:
        from transformers import RobertaConfig

        return RobertaConfig(**_roberta_like_keys(cfg))


class LongformerConverter(EncoderConverter):
    """LongformerForMaskedLM ("longformer"): token window, global tokens and projections."""

    model_type = "longformer"
    prefix = "longformer."
    global_projections = True

    @staticmethod
    def pattern(window: int | list[int]) -> dict[str, Any]:
        """The attention keys of Longformer's `attention_window`, one window or one per layer:
        the first layer's is attention.window_tokens, each other window an attention.layers
        entry selecting the layers that have it."""
        windows = window if isinstance(window, list) else [window]
        base = windows[0]
        layers = [
            {"layers": [i for i, w in enumerate(windows) if w == other], "window_tokens": other}
            for other in dict.fromkeys(windows)
            if other != base
        ]
        return {
            "causal": False, "window_tokens": base, "global_blocks": 0, "random_blocks": 0,
            "global_projections": True, **({"layers": layers} if layers else {}),
        }  # fmt: skip

    @staticmethod
    def windows(cfg: Config) -> list[int]:
        """attention_window of the run: each layer's token window."""
        n = cfg.model.n_layers
        return [cfg.attention.for_layer(i, n).window_tokens for i in range(n)]

    def refusal(self, config: dict[str, Any]) -> str | None:
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            return f"hidden_act={act!r}: the Longformer MLM head is erf GELU, as must be the blocks"
        window = config.get("attention_window", 512)
        windows = window if isinstance(window, list) else [window]
        if any(not isinstance(w, int) or w <= 0 or w % 2 for w in windows):
            return f"attention_window={window}: each window must be a positive even integer"
        if isinstance(window, list) and len(window) != config["num_hidden_layers"]:
            return (
                f"attention_window={window}: one window per layer, and num_hidden_layers="
                f"{config['num_hidden_layers']}"
            )
        return super().refusal(config)

    def model_values(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            **super().model_values(config),
            "mlp": "gelu",
            "position_offset": config.get("pad_token_id", 1) + 1,
        }

    def attention_values(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.pattern(config.get("attention_window", 512))

    def accepts(self, cfg: Config) -> bool:
        return cfg.model.position_offset > 0 and not RobertaConverter().accepts(cfg)

    def exports_pattern(self, cfg: Config) -> bool:
        return True  # check_run refuses a run whose pattern is not Longformer's

    def check_run(self, cfg: Config) -> None:
        super().check_run(cfg)
        _check_roberta_like(self.model_type, cfg)
        a, n = cfg.attention, cfg.model.n_layers
        layers = [a.for_layer(i, n) for i in range(n)]
        plain = not a.global_tokens and all(
            p.window_tokens > 0 and p.global_blocks == 0 and p.random_blocks == 0
            and p.max_dilation == 1 for p in layers
        )  # fmt: skip
        if not plain:
            raise ValueError(
                "this run cannot be written as a Longformer: each layer's pattern must be a token "
                "window (attention.window_tokens > 0, per layer through attention.layers) and "
                "per-sample global tokens only (global_blocks=0, random_blocks=0, no "
                "global_tokens or dilation)"
            )

    def hf_config(self, cfg: Config) -> Any:
        from transformers import LongformerConfig

        return LongformerConfig(**_roberta_like_keys(cfg), attention_window=self.windows(cfg))


class BigBirdConverter(EncoderConverter):
    """BigBirdForMaskedLM ("big_bird"): original_full exactly; block_sparse with its pattern."""

    model_type = "big_bird"
    prefix = "bert."
    head = {"dense": "cls.predictions.transform.dense",
            "norm": "cls.predictions.transform.LayerNorm", "bias": "cls.predictions.bias",
            "decoder": "cls.predictions.decoder"}  # fmt: skip
    pooler = "pooler"
    _ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

    def refusal(self, config: dict[str, Any]) -> str | None:
        act = config.get("hidden_act", "gelu_new")
        if act not in self._ACTS:
            return f"hidden_act={act!r}: halotron's encoder has {', '.join(self._ACTS)}"
        if config.get("rescale_embeddings"):
            return "rescale_embeddings=true: halotron's encoder does not scale its embeddings"
        if not config.get("use_bias", True):
            return "use_bias=false: halotron's encoder has q / k / v biases"
        attention_type = config.get("attention_type", "block_sparse")
        if attention_type not in ("original_full", "block_sparse"):
            return f"attention_type={attention_type!r}"
        return super().refusal(config)

    def model_values(self, config: dict[str, Any]) -> dict[str, Any]:
        act = self._ACTS[config.get("hidden_act", "gelu_new")]
        return {**super().model_values(config), "mlp": act, "position_offset": 0}

    def attention_values(self, config: dict[str, Any]) -> dict[str, Any]:
        if config.get("attention_type", "block_sparse") == "original_full":
            return {"causal": False}
        random_blocks = config.get("num_random_blocks", 3)
        if random_blocks:
            log.warning(
                "num_random_blocks=%d: the imported model is HF's block_sparse function in "
                "training mode up to which random blocks each query block sees: halotron draws "
                "its own per head (seeded by attention.seed, step, layer and head, from every "
                "block outside the window and the global blocks), HF draws with numpy seeded by "
                "the layer index (the same blocks at every step, among the first 2r+5 blocks), "
                "and in eval mode HF makes every random block block 0, which it then counts "
                "twice (no pattern does that)", random_blocks,
            )  # fmt: skip
        return {
            "causal": False, "block_size": config.get("block_size", 64), "window_blocks": 3,
            "window_tokens": 0, "global_blocks": 2, "random_blocks": random_blocks,
            "random_per_head": True,
        }  # fmt: skip

    def fit_to(self, model, attention, state, seq_len):
        """HF's BigBirdModel switches block_sparse to original_full at lengths up to
        (5 + 2 * num_random_blocks) * block_size tokens: so does the import at such a
        train.seq_len."""
        if "random_blocks" not in attention:  # original_full
            return model, attention, state
        full_up_to = (5 + 2 * attention["random_blocks"]) * attention["block_size"]
        if seq_len > full_up_to:
            return model, attention, state
        log.info(
            "train.seq_len=%d <= %d: HF BigBird attends fully at this length (it switches "
            "block_sparse to original_full), and so does the import", seq_len, full_up_to,
        )  # fmt: skip
        return model, {"causal": False}, state

    def accepts(self, cfg: Config) -> bool:
        return cfg.model.position_offset == 0

    def exports_pattern(self, cfg: Config) -> bool:
        """HF's block_sparse: a 3-block window, the first and last block global, random blocks
        (it cannot run without them); its own random draw."""
        a = cfg.attention
        return (
            a.window_blocks == 3 and a.window_tokens == 0 and a.global_blocks == 2
            and a.random_blocks > 0 and a.max_dilation == 1 and not a.global_tokens
            and not a.layers and bool(uncovered_layers(cfg))
        )  # fmt: skip

    def check_run(self, cfg: Config) -> None:
        super().check_run(cfg)
        if cfg.model.position_offset:
            raise ValueError(
                f"this run cannot be written as a BigBird: model.position_offset="
                f"{cfg.model.position_offset} (BigBird counts positions from 0)"
            )

    def hf_config(self, cfg: Config) -> Any:
        from transformers import BigBirdConfig

        from data.tokenizer import BOS_ID, EOS_ID, PAD_ID

        m, a = cfg.model, cfg.attention
        block_sparse = self.exports_pattern(cfg)
        return BigBirdConfig(
            vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads, intermediate_size=m.hidden,
            hidden_act="gelu_new" if m.mlp == "gelu_tanh" else "gelu",
            max_position_embeddings=m.max_positions, type_vocab_size=max(m.type_vocab_size, 1),
            layer_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
            attention_type="block_sparse" if block_sparse else "original_full",
            block_size=a.block_size, num_random_blocks=a.random_blocks,
            pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        )  # fmt: skip


def _check_roberta_like(model_type: str, cfg: Config) -> None:
    m = cfg.model
    if m.position_offset < 1:
        raise ValueError(
            f"this run cannot be written as {model_type}: model.position_offset=0, and HF counts "
            "its positions from pad_token_id + 1 (write it as big_bird)"
        )
    if m.mlp != "gelu":
        raise ValueError(f"this run cannot be written as {model_type}: model.mlp={m.mlp!r}")


def _roberta_like_keys(cfg: Config) -> dict[str, Any]:
    """RoBERTa / Longformer config keys of the run: pad_token_id = position_offset - 1 (HF
    counts positions from it; a token of that id gets the padding position in HF)."""
    from data.tokenizer import BOS_ID, EOS_ID

    m = cfg.model
    return dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, intermediate_size=m.hidden, hidden_act="gelu",
        max_position_embeddings=m.max_positions, type_vocab_size=max(m.type_vocab_size, 1),
        layer_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        pad_token_id=m.position_offset - 1, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
