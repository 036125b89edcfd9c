"""The root training config: per-component dataclasses, loaded from YAML plus dot-list overrides.

    from train.config import load_config, save_config, config_to_dict
    cfg = load_config("configs/demo.yaml", ["train.steps=50", "attention.window_blocks=5"])
    save_config(cfg, "runs/demo/config.yaml")

    python -m train.config configs/demo.yaml train.steps=50    # print the resolved config

Each section is the config dataclass of the component that uses it (`model: ModelArgs`,
`attention: SparsityConfig`, `data: DataArgs`, ...); this file only composes them and checks
what spans two components. Loading walks the dataclass fields generically: values are coerced to
the annotated field type, unknown keys and bad values fail with a ValueError whose sentence
names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from data.loader import DataArgs
from model.registry import ARCHITECTURES
from model.sparse import SparsityConfig
from model.transformer import ModelArgs
from parallel.layout import check_split, sequence_parallel_refusal
from train.checkpoint import CheckpointArgs
from train.deepspeed_config import DeepSpeedArgs, deepspeed_refusal
from train.engine import OptimArgs, ScheduleArgs
from train.metrics import LoggingArgs

__all__ = [
    "Config",
    "TrainArgs",
    "ParallelArgs",
    "load_config",
    "save_config",
    "config_to_dict",
    "config_from_dict",
    "parse_overrides",
    "device_refusal",
]


ENGINES = ("auto", "local", "megatron", "deepspeed")


@dataclass
class TrainArgs:
    """The run: length, batch, seeds, evaluation cadence, output directory."""

    steps: int = 100
    """Optimizer steps of the whole run (a resumed run continues up to this number)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = 2048
    """Tokens per sequence; a multiple of attention.block_size."""
    seed: int = 0
    """Seeds model init, the data order and every RNG."""
    eval_every: int = 0
    """Validate every this many steps (0: only at the end)."""
    eval_batches: int = 4
    """Validation batches (of micro_batch_size sequences) per evaluation."""
    run_dir: str = "runs/demo"
    """Output directory: resolved config, checkpoints, wandb files."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    engine: str = "auto"
    """Training engine: local (one process, torch AdamW), megatron (Megatron-core DDP and
    distributed optimizer; tp, pp, cp, dp), deepspeed (DeepSpeed ZeRO over cp x dp, settings in
    the deepspeed section) or auto (local for one process without parallel degrees, else
    megatron)."""
    max_nan_skips: int = 3
    """A step whose loss is NaN or Inf on any rank is skipped (no update) and counted; this many
    consecutive skips stop the run after a checkpoint, naming the step. 0: never stop."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_len", "eval_batches"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"train.{name}={value!r} must be a positive integer")
        for name in ("seed", "eval_every", "max_nan_skips"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)!r} must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device={self.device!r} must be auto, cpu or cuda")
        if self.engine not in ENGINES:
            raise ValueError(f"train.engine={self.engine!r} must be one of {', '.join(ENGINES)}")


def device_refusal(device: str) -> str | None:
    """Why train.device cannot run in this process (None: it can). Not a load-time check: a
    config written on a GPU machine still loads on a CPU one (export, planning tools)."""
    if device != "cuda" or torch.cuda.is_available():
        return None
    why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
    return (
        f"train.device=cuda but this torch ({torch.__version__}) {why}; set train.device=cpu "
        "(or auto), or run where a GPU is visible"
    )


@dataclass
class ParallelArgs:
    """Parallel layout degrees (tensor, pipeline, context, data). This slice runs one rank."""

    tp: int = 1
    """Tensor-parallel degree (attention heads and MLP width split across ranks)."""
    pp: int = 1
    """Pipeline-parallel degree (layers split into stages)."""
    cp: int = 1
    """Context-parallel degree (the sequence split across ranks, halo exchange)."""
    dp: int | None = None
    """Data-parallel degree; null means world_size / (tp * pp * cp)."""
    sequence_parallel: bool = False
    """Megatron's tensor-parallel sequence parallelism (Megatron-LM's --sequence-parallel):
    norms, residual adds and pipeline sends work on 1/tp of the sequence per tp rank (all-gather
    before, reduce-scatter after each tp region instead of an all-reduce). The same result with
    less activation memory. Needs tp > 1 (refused otherwise) dividing seq_len / cp."""
    timeout_minutes: float = 10.0
    """A collective that waits longer than this fails with an error naming its group (tp, pp,
    cp, dp, ...) instead of hanging; fractions allowed (tests use seconds)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"parallel.{name}={value!r} must be a positive integer")
        if not self.timeout_minutes > 0:
            raise ValueError(f"parallel.timeout_minutes={self.timeout_minutes!r} must be positive")
        reason = sequence_parallel_refusal(self.tp, self.sequence_parallel)
        if reason is not None:
            raise ValueError(reason)


@dataclass
class Config:
    """Root config: composes the components' configs and checks what spans two of them."""

    model: ModelArgs = field(default_factory=ModelArgs)
    attention: SparsityConfig = field(default_factory=lambda: SparsityConfig(causal=True))
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    deepspeed: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        seq_len, attn = self.train.seq_len, self.attention
        try:
            attn.validate_seq_len(seq_len)
        except ValueError as e:
            raise ValueError(f"train.seq_len={seq_len} does not fit the attention: {e}") from e
        if not attn.causal and self.data.objective == "clm":
            raise ValueError(
                "attention.causal=false cannot train a next-token language model: every token "
                "would see the token it must predict; set attention.causal=true, or "
                "data.objective=mlm for a bidirectional (BigBird / Longformer) encoder"
            )
        if attn.etc_tokens and self.parallel.sequence_parallel:
            raise ValueError(
                f"attention.etc_tokens={attn.etc_tokens} cannot be used with "
                "parallel.sequence_parallel=true: the ETC vectors are written into the "
                "embedding's output, which sequence parallelism scatters over tp ranks"
            )
        if attn.etc_tokens >= seq_len:
            raise ValueError(
                f"attention.etc_tokens={attn.etc_tokens} must be less than train.seq_len={seq_len}"
            )
        if attn.causal and self.data.objective == "mlm":
            raise ValueError(
                "data.objective=mlm trains a bidirectional encoder: set attention.causal=false "
                "(a causal model predicts the next token, data.objective=clm)"
            )
        attn.check_layers(self.model.n_layers, self.model.n_heads)  # attention.layers, dilation
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(
                f"schedule.min_lr={self.schedule.min_lr} must not exceed optim.lr={self.optim.lr}"
            )
        if self.model.arch not in ARCHITECTURES:
            raise ValueError(
                f"model.arch={self.model.arch!r} is not one of {', '.join(sorted(ARCHITECTURES))}"
            )
        par = self.parallel
        if self.model.arch == "encoder":
            _check_encoder(self.model, seq_len)
        check_split(par.tp, par.pp, par.cp, par.sequence_parallel, self.model, attn, seq_len)
        if self.train.engine == "deepspeed":
            reason = deepspeed_refusal(par.pp)
            if reason is not None:
                raise ValueError(reason)


def _check_encoder(model: ModelArgs, seq_len: int) -> None:
    """What model.arch=encoder (model/encoder.py) needs of the run, refused at load time."""
    if model.max_positions < seq_len + model.position_offset:
        raise ValueError(
            f"model.max_positions={model.max_positions} is too few for train.seq_len={seq_len} "
            f"with model.position_offset={model.position_offset}: positions up to "
            f"{seq_len + model.position_offset - 1} read its rows"
        )


# ---- generic loading -----------------------------------------------------------------------


class _Raw(str):
    """An override's text, interpreted only once the target field type is known."""


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (tuple, list):
        inner = args[0] if args else Any
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis:
            return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ')}s"
        return f"a list of {_describe(inner).removeprefix('an ').removeprefix('a ')}s"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _plain(value: Any) -> Any:
    """A free-form value (a pass-through mapping such as deepspeed.config) with the override
    texts inside it read as YAML."""
    if isinstance(value, _Raw):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _Raw):
        if tp is str or (origin in (typing.Union, types.UnionType) and str in args):
            if value.strip() in ("null", "None", "~", "") and type(None) in args:
                return None
            return str(value)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            value = str(value)
    if tp is Any:
        return _plain(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, key)
            except ValueError:
                continue
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
            if fixed and len(value) != len(args):
                raise ValueError(f"{key}={value!r} must be {_describe(tp)}")
            inner = args if fixed else [args[0] if args else Any] * len(value)
            items = [_coerce(v, t, key) for v, t in zip(value, inner, strict=True)]
            return tuple(items) if origin is tuple else items
    elif dataclasses.is_dataclass(tp):
        raise ValueError(f"{key} is a section; give its keys ({key}.KEY=VALUE)")
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"{key}={value!r} must be {_describe(tp)}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, recursing into dataclass-typed fields."""
    where = prefix or "the config"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of keys to values; got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ValueError(_unknown_key_message(key, where, list(fields)))
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{key} is a section; give its keys ({key}.KEY=VALUE)")
            section = {**_section_defaults(fields[name]), **(value or {})}
            kwargs[name] = _build(tp, section, key)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, tp, key)
    for name, f in fields.items():  # a section left out of the YAML still gets built
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _build(hints[name], _section_defaults(f), key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        if prefix and f"{prefix}." not in message:
            message = f"invalid {prefix} config: {message}"
        raise ValueError(message) from e


def _section_defaults(f: dataclasses.Field) -> dict[str, Any]:
    """The values of a section's default instance: a parent may default a section differently
    from the section class itself (the trainer's attention is causal)."""
    if f.default_factory is not dataclasses.MISSING:
        return config_to_dict(f.default_factory())
    if dataclasses.is_dataclass(f.default):
        return config_to_dict(f.default)
    return {}


def _unknown_key_message(key: str, where: str, valid: list[str]) -> str:
    name = key.rsplit(".", 1)[-1]
    kind = "key" if "." in key else "section"
    message = f"unknown config {kind} '{key}'; valid keys of {where}: {', '.join(valid)}"
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        message += f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}"
        message += f"{close[0]}'?)"
    return message


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Dot-list overrides `section.key=value` as a nested dict of raw (untyped) values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(
                f"override {item!r} must look like section.key=value (e.g. train.steps=50)"
            )
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} sets a key inside the value {key}")
        node[parts[-1]] = _Raw(text)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, f"{prefix}{key}.")
        elif isinstance(value, dict) and key in merged and merged[key] is not None:
            raise ValueError(f"override sets keys inside {prefix}{key}, which is a value")
        else:
            merged[key] = value
    return merged


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML keeps the last one
    silently, so `random_pool_blocks: 8` above an existing `random_pool_blocks: 0` would do
    nothing)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ValueError(
                    f"{self.name}, line {line}: key {key!r} is given twice in one section "
                    f"(first at line {seen[key]}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML file's values; malformed YAML or a repeated key raises a one-sentence
    ValueError naming the file and line."""
    with open(path) as f:
        try:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = e.problem or e.context or "not valid YAML"
            tab = "\\t" in problem  # pyyaml writes the tab it found as \t
            hint = " (YAML indents with spaces, not tabs)" if tab else ""
            raise ValueError(f"{path}{where}: {problem}{hint}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start from defaults with None) and apply dot-list overrides."""
    values: Any = {}
    if path is not None:
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    return config_from_dict(_merge(values, parse_overrides(overrides)))


def config_to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-safe) values of a config: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: config_to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.init and not f.name.startswith("_")
        }
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)


if __name__ == "__main__":
    print(yaml.safe_dump(config_to_dict(load_config(sys.argv[1], sys.argv[2:])), sort_keys=False))
