"""Llama (HF LlamaForCausalLM) <-> halotron's decoder (model/transformer.py), weights exact.

    python -m train.hf import --hf-dir path/to/llama --out runs/llama data.path=...   # train/hf.py
    python -m train.hf export --checkpoint runs/llama --out hf_llama

Both are the same architecture (pre-norm RMSNorm blocks, RoPE, SwiGLU, an untied or tied LM
head); what differs is only how the weights are laid out:
- RoPE pairs: HF rotates the halves of a head (rotate_half: dims i and i + d/2 share a
  frequency), model/rope.py rotates interleaved pairs (2i, 2i + 1). Permuting the rows of the q
  and k projections inside every head (HF row i -> our row 2i, HF row i + d/2 -> our row 2i + 1)
  makes the two the same function: q.k is unchanged by permuting both the same way, and the
  pair sharing frequency i is rotated identically. The reverse of Meta -> HF's conversion
  permute.
- Fused projections: our attn.qkv rows are [q | k | v] (each head's d rows contiguous, as
  Attention._project views them), our mlp.up rows are [gate | up] (model/layers.py: MLP).
- Names: embed_tokens / input_layernorm / post_attention_layernorm / norm / lm_head are
  embed / attn_norm / mlp_norm / norm / lm_head; o_proj is attn.out, down_proj mlp.down.
What cannot be converted exactly is refused with a sentence naming the HF config key:
grouped-query attention (num_key_value_heads != num_attention_heads), attention or MLP biases,
RoPE scaling, an activation other than silu, a head_dim other than hidden_size / heads.
Legend: h heads, d head dim, c d_model (the input features of a projection).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from train.hf_common import HfState, read_hf_config, read_hf_weights

if TYPE_CHECKING:
    from train.config import Config

__all__ = ["LlamaConverter", "llama_refusal", "to_halotron", "to_llama"]


def _rope_theta(config: dict[str, Any]) -> float:
    """rope_theta of a transformers 4 (top level) or 5 (rope_parameters) config.json."""
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def llama_refusal(config: dict[str, Any]) -> str | None:
    """Why the Llama `config` (config.json) has no exact halotron equivalent, naming the key;
    None when it has one."""
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    if kv_heads != heads:
        return (
            f"num_key_value_heads={kv_heads} differs from num_attention_heads={heads} "
            "(grouped-query attention): halotron's attention has one key/value head per query head"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            return f"{key}=true: halotron's projections have no biases"
    act = config.get("hidden_act", "silu")
    if act != "silu":
        return f"hidden_act={act!r}: halotron's SwiGLU gates with silu"
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        return (
            f"head_dim={head_dim} is not hidden_size / num_attention_heads = {hidden // heads}: "
            "halotron's heads split d_model"
        )
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        return f"rope_scaling={scaling}: halotron's RoPE has no scaling (a plain rope_theta)"
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        return (
            f"rope_parameters.rope_type={rope_type!r}: halotron's RoPE has no scaling (a plain "
            "rope_theta)"
        )
    return None


def _halves_to_pairs(w_oc: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k projection rows of HF's rotate-half layout in model/rope.py's interleaved one."""
    out, c = w_oc.shape
    d = out // heads
    return w_oc.reshape(heads, 2, d // 2, c).transpose(1, 2).reshape(out, c)


def _pairs_to_halves(w_oc: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of _halves_to_pairs."""
    out, c = w_oc.shape
    d = out // heads
    return w_oc.reshape(heads, d // 2, 2, c).transpose(1, 2).reshape(out, c)


# Per layer: (HF name under model.layers.{i}., ours under blocks.{i}.) of the tensors that
# are the same tensor; q, k, v and gate, up are fused (to_halotron / to_llama).
_SAME = (
    ("self_attn.o_proj.weight", "attn.out.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "mlp_norm.weight"),
    ("mlp.down_proj.weight", "mlp.down.weight"),
)


def to_halotron(
    tensors: dict[str, torch.Tensor], n_layers: int, heads: int, tie: bool
) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM tensors (model.* and lm_head.*) as the single-process Transformer's
    state dict, in float32; ValueError naming a missing or an unexpected tensor."""
    hf = dict(tensors)

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"the HF weights have no tensor {name!r}")
        return hf.pop(name).float()

    out = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        q = _halves_to_pairs(take(src + "self_attn.q_proj.weight"), heads)
        k = _halves_to_pairs(take(src + "self_attn.k_proj.weight"), heads)
        v = take(src + "self_attn.v_proj.weight")
        out[dst + "attn.qkv.weight"] = torch.cat([q, k, v])
        gate, up = take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")
        out[dst + "mlp.up.weight"] = torch.cat([gate, up])
        for hf_name, name in _SAME:
            out[dst + name] = take(src + hf_name)
    out["norm.weight"] = take("model.norm.weight")
    if tie:
        hf.pop("lm_head.weight", None)  # some tied checkpoints store the copy
        out["lm_head.weight"] = out["embed.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    # Old checkpoints store RoPE's inverse frequencies: a function of rope_theta, not a weight.
    left = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise ValueError(
            f"the HF weights hold tensors a Llama decoder has no place for: {', '.join(left[:5])}"
        )
    return out


def to_llama(
    state_dict: dict[str, torch.Tensor], n_layers: int, heads: int
) -> dict[str, torch.Tensor]:
    """The single-process Transformer's state dict in LlamaForCausalLM's names and layout
    (lm_head.weight included, also when tied: from_pretrained ties it again)."""
    out = {"model.embed_tokens.weight": state_dict["embed.weight"]}
    for i in range(n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state_dict[src + "attn.qkv.weight"].chunk(3)
        out[dst + "self_attn.q_proj.weight"] = _pairs_to_halves(q, heads)
        out[dst + "self_attn.k_proj.weight"] = _pairs_to_halves(k, heads)
        out[dst + "self_attn.v_proj.weight"] = v
        gate, up = state_dict[src + "mlp.up.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        for hf_name, name in _SAME:
            out[dst + hf_name] = state_dict[src + name]
    out["model.norm.weight"] = state_dict["norm.weight"]
    out["lm_head.weight"] = state_dict["lm_head.weight"]
    return {name: t.contiguous() for name, t in out.items()}


class LlamaConverter:
    """train.hf_common.Converter for HF's "llama" model type."""

    model_type = "llama"
    arch = "transformer"

    def from_hf(self, hf_dir: Path) -> HfState:
        config = read_hf_config(hf_dir)
        reason = llama_refusal(config)
        if reason is not None:
            raise ValueError(f"cannot convert {hf_dir} exactly: config.json has {reason}")
        tie = bool(config.get("tie_word_embeddings", False))
        model = {
            "arch": self.arch,
            "vocab_size": config["vocab_size"],
            "d_model": config["hidden_size"],
            "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "ffn_hidden": config["intermediate_size"],
            "mlp": "swiglu",
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "rope_theta": _rope_theta(config),
            "tie_embeddings": tie,
        }
        tensors = {
            # LlamaModel (no LM head) and LlamaForCausalLM (model.*): one naming
            k if k.startswith(("model.", "lm_head.")) else f"model.{k}": t
            for k, t in read_hf_weights(hf_dir).items()
        }
        state = to_halotron(tensors, model["n_layers"], model["n_heads"], tie)
        return model, {"causal": True}, state

    def to_hf(self, cfg: Config, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        from data.tokenizer import BOS_ID, EOS_ID, PAD_ID

        m, attn = cfg.model, cfg.attention
        refusals = {
            "model.arch": (m.arch != self.arch, f"{m.arch!r} is not the decoder {self.arch!r}"),
            "model.mlp": (m.mlp != "swiglu", f"{m.mlp!r}: Llama's MLP is SwiGLU"),
            "attention.causal": (not attn.causal, "false: a Llama is a causal language model"),
            "attention.global_projections": (
                attn.global_projections,
                "true: Llama has no separate global query/key/value projections",
            ),
        }
        for key, (refused, why) in refusals.items():
            if refused:
                raise ValueError(f"this run cannot be written as a Llama: {key}={why}")
        config = LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.d_model,
            intermediate_size=m.hidden,
            num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads,
            num_key_value_heads=m.n_heads,
            hidden_act="silu",
            max_position_embeddings=cfg.train.seq_len,
            rms_norm_eps=m.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
            tie_word_embeddings=m.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
        model = LlamaForCausalLM(config)
        model.load_state_dict(to_llama(state_dict, m.n_layers, m.n_heads), strict=True)
        model.save_pretrained(out_dir)
