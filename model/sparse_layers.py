"""Per-layer attention patterns: `attention.layers`, overrides of the pattern for some layers.

    attention:
      window_tokens: 256                              # every layer, unless overridden below
      layers:
        - {layers: "4:", window_tokens: 512}          # wider windows higher up (Longformer)
        - {layers: "8:", dilation: [1, 1, 2, 4]}      # dilation on some heads of the top layers
        - {layers: "5::6", window_tokens: 1048576}    # every 6th layer global (Gemma)

Each entry selects layers with `layers` and sets, for them, any of LAYER_KEYS. A selector is
a Python slice of range(n_layers) written as a string ("0:6", "5::6", "-2:"), or an integer,
or a list of integers (negative ones count from the end, as in Python). Entries apply in
order, a later one overriding an earlier one on the layers both select. A full-attention
("global") layer is a window wider than the sequence.

`SparsityConfig.for_layer(i, n_layers)` is the plain pattern of layer i (no `layers` left):
what the model gives the attention of block i, what the flop count, the cp plans and traffic,
and the pictures read. A config whose `layers` is not empty describes a model, not one
attention: the kernels refuse it (SparsityConfig.window_band) rather than use its base pattern.
Checked when the config is built: the selectors' form, the keys (unknown ones, and those that
are the same for every layer), each entry's values; and, once n_layers and n_heads are known
(`SparsityConfig.check_layers`, train.config), integer selectors in range and every layer's
per-head dilation list.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.sparse_pattern import SparsityConfig

__all__ = ["LAYER_KEYS", "LayerOverride", "normalize_layers", "layer_values"]

LAYER_KEYS = (
    "window_blocks",
    "window_tokens",
    "dilation",
    "global_blocks",
    "random_blocks",
    "random_per_head",
    "random_pool_blocks",
)
"""The fields an `attention.layers` entry may set: the layer's pattern. The others describe the
sequence or the model (block_size, causal, global_tokens, etc_tokens, global_projections,
seed) and are the same in every layer."""

_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


class LayerOverride(dict):
    """One entry of `attention.layers`: {"layers": selector, field: value, ...}. A plain
    mapping to YAML, read-only and hashable: the frozen config holding it is a cache key
    (parallel.cp_plan)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return LayerOverride, (dict(self),)

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an attention.layers entry is read-only; build a new config")

    __setitem__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]


def _freeze(value: Any) -> Any:
    """Lists as tuples, so that an entry is hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """A stored value as it was written (tuples as lists), for messages."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_selector(selector: Any, where: str) -> Any:
    """The selector in its stored form (a slice string, an int or a tuple of ints)."""
    if isinstance(selector, str):
        match = _SLICE.match(selector)
        if match and (match.group(3) is None or int(match.group(3)) != 0):
            return selector
    elif _is_int(selector):
        return selector
    elif isinstance(selector, (list, tuple)) and selector and all(map(_is_int, selector)):
        return tuple(selector)
    raise ValueError(
        f"{where}.layers={selector!r} must select layers: a Python slice of range(n_layers) "
        'as a string ("0:6", "5::6", "-1:"), an integer or a non-empty list of integers'
    )


def selected_layers(selector: Any, n_layers: int, where: str) -> list[int]:
    """The layers of `n_layers` that `selector` selects; an integer out of range raises."""
    if isinstance(selector, str):
        parts = [int(p) if p.strip() else None for p in selector.split(":")]
        return list(range(n_layers))[slice(*parts)]
    chosen = []
    for index in (selector,) if _is_int(selector) else selector:
        if not -n_layers <= index < n_layers:
            raise ValueError(
                f"{where}.layers={_plain(selector)!r}: layer {index} is not one of the model's "
                f"{n_layers} layers (model.n_layers)"
            )
        chosen.append(index % n_layers)
    return chosen


def normalize_layers(cfg: SparsityConfig, entries: Any) -> tuple[LayerOverride, ...]:
    """`entries` (attention.layers as given) checked and frozen; `cfg` is the base pattern.
    Each entry's values are checked by building the base pattern with them."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(
            f"attention.layers={entries!r} must be a list of mappings, each with a `layers` "
            "selector and the pattern keys to set for those layers"
        )
    if not entries:
        return ()
    fields = [f.name for f in dataclasses.fields(cfg) if f.init]
    base = dataclasses.replace(cfg, layers=())
    out = []
    for k, entry in enumerate(entries):
        where = f"attention.layers[{k}]"
        if not isinstance(entry, Mapping) or "layers" not in entry:
            raise ValueError(
                f"{where}={entry!r} must be a mapping with a `layers` selector (e.g. "
                '{layers: "0:6", window_tokens: 512})'
            )
        values = {}
        for key, value in entry.items():
            if key == "layers":
                continue
            if key in fields:
                if key not in LAYER_KEYS:
                    raise ValueError(
                        f"{where}.{key} cannot differ per layer: it describes the sequence or "
                        f"the model; set attention.{key} for every layer. A layer may set "
                        f"{', '.join(LAYER_KEYS)}"
                    )
            else:
                message = f"unknown key '{where}.{key}'; a layer may set {', '.join(LAYER_KEYS)}"
                close = difflib.get_close_matches(str(key), LAYER_KEYS, n=1)
                raise ValueError(message + (f" (did you mean '{close[0]}'?)" if close else ""))
            if key == "random_per_head" and not isinstance(value, bool):
                raise ValueError(f"{where}.{key}={value!r} must be true or false")
            values[key] = _freeze(value)
        if not values:
            raise ValueError(f"{where} sets nothing; give the keys to set, e.g. window_tokens")
        selector = _check_selector(entry["layers"], where)
        try:
            dataclasses.replace(base, **values)
        except (ValueError, TypeError) as e:
            raise ValueError(str(e).replace("attention.", f"{where}.", 1)) from e
        out.append(LayerOverride({"layers": selector, **values}))
    return tuple(out)


def layer_values(entries: tuple[Mapping, ...], layer: int, n_layers: int) -> dict:
    """The fields the entries set for `layer` of `n_layers`, later entries winning."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is not one of the model's {n_layers} layers")
    values: dict[str, Any] = {}
    for k, entry in enumerate(entries):
        if layer in selected_layers(entry["layers"], n_layers, f"attention.layers[{k}]"):
            values.update((key, value) for key, value in entry.items() if key != "layers")
    return values
