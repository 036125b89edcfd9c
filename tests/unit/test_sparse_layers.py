"""Per-layer attention patterns (attention.layers, model/sparse_layers.py): selection, loading,
refusals, and a model whose layers differ against a reference built layer by layer.

    pytest tests/unit/test_sparse_layers.py

The cp side (each layer's plans and traffic) is in tests/distributed/test_context_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from model.sparse import SparsityConfig, count_pairs, reference_attention, sparse_attention
from model.transformer import ModelArgs, Transformer, lm_loss
from train.config import load_config, save_config
from train.flops import attention_pairs

BASE = dict(block_size=8, window_tokens=6, global_blocks=1, random_blocks=1, causal=True)
LAYERS = (
    {"layers": "1:", "window_tokens": 20, "dilation": [1, 2]},  # wider, dilated on head 1
    {"layers": [-1], "window_tokens": 1000, "random_blocks": 0},  # the last layer global
)
# The same three patterns written out by hand (what for_layer must give).
EXPLICIT = [
    SparsityConfig(**BASE),
    SparsityConfig(**dict(BASE, window_tokens=20, dilation=(1, 2))),
    SparsityConfig(**dict(BASE, window_tokens=1000, dilation=(1, 2), random_blocks=0)),
]


def test_for_layer_applies_the_selected_entries_in_order():
    cfg = SparsityConfig(**BASE, layers=LAYERS)
    assert [cfg.for_layer(i, 3) for i in range(3)] == EXPLICIT
    assert all(cfg.for_layer(i, 3).layers == () for i in range(3))
    assert SparsityConfig(**BASE).for_layer(2, 3) == EXPLICIT[0]  # no entries: every layer


@pytest.mark.parametrize(
    "selector, n_layers, chosen",
    [
        ("0:2", 4, [0, 1]),
        ("5::6", 12, [5, 11]),
        ("-2:", 4, [2, 3]),
        ("::2", 5, [0, 2, 4]),
        ("8:", 4, []),  # a slice may select nothing (a recipe shrunk for a smoke test)
        (3, 4, [3]),
        ([0, -1], 4, [0, 3]),
    ],
)
def test_selectors_are_python_slices_and_indices(selector, n_layers, chosen):
    cfg = SparsityConfig(**BASE, layers=[{"layers": selector, "window_tokens": 40}])
    got = [i for i in range(n_layers) if cfg.for_layer(i, n_layers).window_tokens == 40]
    assert got == chosen


def test_recipe_loads_saves_and_reloads(tmp_path):
    recipe = tmp_path / "layers.yaml"
    recipe.write_text(
        "model: {n_layers: 3, n_heads: 2, d_model: 32}\n"
        "attention:\n"
        "  block_size: 8\n  window_tokens: 6\n  global_blocks: 1\n  random_blocks: 1\n"
        "  causal: true\n"
        "  layers:\n"
        '    - {layers: "1:", window_tokens: 20, dilation: [1, 2]}\n'
        "    - {layers: [-1], window_tokens: 1000, random_blocks: 0}\n"
        "train: {seq_len: 64}\n"
    )
    cfg = load_config(recipe)
    assert [cfg.attention.for_layer(i, 3) for i in range(3)] == EXPLICIT
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").attention == cfg.attention
    override = 'attention.layers=[{layers: "0:1", window_blocks: 2, window_tokens: 0}]'
    cfg = load_config(recipe, [override])
    assert cfg.attention.for_layer(0, 3).window_blocks == 2
    assert cfg.attention.for_layer(1, 3) == EXPLICIT[0]


@pytest.mark.parametrize(
    "entries, match",
    [
        ('[{layers: "1:", windw_tokens: 8}]', r"unknown key 'attention.layers\[0\].windw_tokens'"
         r".*did you mean 'window_tokens'"),
        ('[{layers: "1:", causal: false}]', r"attention.layers\[0\].causal cannot differ"),
        ('[{layers: "1:x", window_tokens: 8}]', r"attention.layers\[0\].layers='1:x' must select"),
        ('[{layers: "::0", window_tokens: 8}]', r"attention.layers\[0\].layers='::0' must select"),
        ('[{window_tokens: 8}]', r"attention.layers\[0\]=.* must be a mapping with a `layers`"),
        ('[{layers: 1}]', r"attention.layers\[0\] sets nothing"),
        ('[{layers: [7], window_tokens: 8}]', r"attention.layers\[0\].layers=\[7\]: layer 7 is "
         r"not one of the model's 4 layers"),
        ('[{layers: 1, window_tokens: -2}]',
         r"attention.layers\[0\].window_tokens=-2 must be a non-negative integer"),
        ('[{layers: "2:", dilation: [1, 2, 3]}]',
         r"layer 2 \(attention.layers\): attention.dilation has 3 values but the layer has 4"),
        ('[{layers: 0, random_per_head: 1}]', r"attention.layers\[0\].random_per_head=1 must be"),
        ("{layers: 0}", r"attention.layers=.* must be a list"),
    ],
)  # fmt: skip
def test_bad_entries_fail_at_load_naming_the_key(entries, match):
    with pytest.raises(ValueError, match=match):
        load_config("configs/demo.yaml", [f"attention.layers={entries}"])


def test_bidirectional_window_parity_is_checked_per_entry():
    with pytest.raises(ValueError, match=r"attention.layers\[0\].window_tokens=7 must be even"):
        SparsityConfig(window_tokens=8, layers=[{"layers": 0, "window_tokens": 7}])


def test_kernels_refuse_a_config_that_differs_per_layer():
    cfg = SparsityConfig(**BASE, layers=LAYERS)
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match=r"for_layer\(layer, n_layers\)"):
        sparse_attention(q, q, q, cfg)
    with pytest.raises(ValueError, match=r"for_layer"):
        count_pairs(cfg, 64)


def _loss(model, tokens):
    logits = model(tokens, step=2)
    loss, count = lm_loss(logits[:, :-1], tokens[:, 1:], torch.ones_like(tokens[:, 1:]))
    return loss / count


def test_model_whose_layers_differ_equals_a_reference_built_layer_by_layer():
    args = ModelArgs(vocab_size=64, d_model=32, n_layers=3, n_heads=2)
    tokens = torch.randint(0, 64, (2, 72), generator=torch.Generator().manual_seed(0))
    model = Transformer(args, SparsityConfig(**BASE, layers=LAYERS), sparse_attention, seed=1)
    reference = Transformer(args, EXPLICIT[0], reference_attention, seed=1)
    for block, pattern in zip(reference.blocks, EXPLICIT, strict=True):
        block.attn.attn_cfg = pattern  # the dense oracle, each layer's pattern written out
    loss, ref = _loss(model, tokens), _loss(reference, tokens)
    assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref, list(reference.parameters()))
    assert max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads, strict=True)) < 1e-5
    uniform = Transformer(args, EXPLICIT[0], sparse_attention, seed=1)
    assert abs(_loss(uniform, tokens).item() - ref.item()) > 1e-4  # the layers really differ


def test_flop_count_sums_each_layers_own_pairs():
    cfg = SparsityConfig(**BASE, layers=LAYERS)
    expected = sum(count_pairs(p, 72, 2, layer) for layer, p in enumerate(EXPLICIT))
    assert attention_pairs(cfg, 72, 2, 3) == expected
    assert attention_pairs(EXPLICIT[0], 72, 2, 3) < expected
