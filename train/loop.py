"""The training loop: a Trainer builds the run, then steps, logs, validates and checkpoints.

    from train.config import load_config
    from train.loop import train
    result = train(load_config("configs/demo.yaml", ["train.steps=20"]), resume=False)

Usually started through `python -m train --config configs/demo.yaml [--resume]` (or a launcher,
docs/launch.md). The loop only orchestrates; the math lives in the model and the engine
(`train.engine.Engine`: LocalEngine for one process, MegatronEngine for tp/pp/cp/dp,
DeepSpeedEngine for ZeRO), the data in the stream, the files in the checkpoint manager and the
metrics logger. What a checkpoint holds is the `state_dict` of four Stateful objects, the same
for every engine: the engine (its tensors in model space, train.model_space, or DeepSpeed's own
files under `<checkpoint dir>/engine/step_N/`, written before the loop's commit), the data
stream, the RNGs and the run's progress (`TrainResult`).
SIGTERM / SIGUSR1 stop every rank after the same step with a checkpoint (train.preemption).
With checkpoint.async_save a checkpoint is committed at the next save or at the end of the run
(preemption and a NaN stop included), always between steps, on every rank together.
A NaN/Inf loss skips the update (every engine, agreed by all ranks); train.max_nan_skips
consecutive skips stop the run after a checkpoint (NonFiniteLossError). A collective that
waits longer than parallel.timeout_minutes fails with CollectiveTimeout naming its group. What
is logged per step (throughput, MFU, step-time split, memory, traffic) is in
train/step_metrics.py; the attention pattern's picture is attached to the wandb run at start.
Step numbers are 1-based in logs, checkpoints and wandb (step N = N optimizer updates done);
the random-block draw of update N uses step N - 1.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.loader import build_train_stream, build_val_batches
from parallel.collective_timeout import name_failed_collectives
from train.checkpoint import CheckpointManager
from train.config import Config, config_to_dict, save_config
from train.engine import NonFiniteLossError, StepStats
from train.engine_choice import build_engine, engine_kind, prune_engine_checkpoints
from train.evaluate import evaluate
from train.metrics import MetricsLogger
from train.preemption import GracefulStop, fault_injection, hang_injection
from train.run_lock import RunLock
from train.run_setup import (
    LaunchEnv,
    check_data,
    resolve_device,
    resume_mode,
    rng_state,
    seed_everything,
    set_rng_state,
)
from train.step_metrics import StepMeter, render_run_pattern

__all__ = ["train", "Trainer", "TrainResult"]

log = logging.getLogger(__name__)

PROGRESS_VERSION = 1


@dataclass
class TrainResult:
    """What a run did, resumed parts included; the run's progress in its checkpoints."""

    losses: list[float] = field(default_factory=list)
    """Training loss of every step so far (index i = step i + 1)."""
    val_history: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation loss) of every evaluation."""
    start_step: int = 0
    """Steps already done when this process started (the resumed checkpoint's step)."""
    steps: int = 0
    """Steps done at the end."""
    tokens: int = 0
    """Loss-carrying tokens trained on over the whole run."""
    seconds: float = 0.0
    """Wall time of this process's training (setup included)."""
    skipped_steps: int = 0
    """Steps whose NaN/Inf loss skipped the update, over the whole run."""
    nan_streak: int = 0
    """Consecutive skipped steps up to now (not checkpointed: a resume starts a new streak)."""
    wandb_run_id: str | None = None
    wandb_dir: str | None = None
    run_dir: str = ""
    preempted: bool = False
    """Stopped early by SIGTERM / SIGUSR1 after writing a checkpoint of `steps`."""

    @property
    def val_loss(self) -> float | None:
        return self.val_history[-1][1] if self.val_history else None

    def mean_loss(self, first: bool, n: int = 10) -> float:
        """Mean of the first or last `n` finite losses (skipped NaN/Inf steps left out)."""
        finite = [x for x in self.losses if math.isfinite(x)]
        window = finite[:n] if first else finite[-n:]
        return sum(window) / len(window) if window else float("nan")

    def record(self, stats: StepStats) -> int:
        """Count one step's stats; returns the step's number (1-based)."""
        self.steps += 1
        self.losses.append(stats.loss)
        self.tokens += stats.n_tokens
        self.skipped_steps += stats.skipped
        self.nan_streak = self.nan_streak + 1 if stats.skipped else 0
        return self.steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": PROGRESS_VERSION,
            "step": self.steps,
            "losses": list(self.losses),
            "val_history": list(self.val_history),
            "tokens": self.tokens,
            "skipped_steps": self.skipped_steps,
            "wandb_run_id": self.wandb_run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != PROGRESS_VERSION:
            raise ValueError(f"run progress version {state.get('version')!r} is not supported")
        self.start_step = self.steps = state["step"]
        self.losses = list(state["losses"])
        self.val_history = [(int(s), float(v)) for s, v in state["val_history"]]
        self.tokens, self.skipped_steps = state["tokens"], state["skipped_steps"]
        self.wandb_run_id = state["wandb_run_id"]


class RngState:
    """This process's RNGs as a Stateful; restored as saved only at the same place (rank,
    world and layout: megatron-core's tracker belongs to one tp rank of one layout)."""

    def __init__(self, place: str) -> None:
        self.place = place

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.place)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.place)


def train(cfg: Config, resume: bool | str = False) -> TrainResult:
    """Run (or continue, with `resume`: a bool or one of RESUME_MODES) the training of `cfg`.

    The engine is `engine_kind`: by default the single-process LocalEngine for one process,
    and the Megatron-core engine under torchrun (WORLD_SIZE > 1) or with any parallel degree
    > 1, on the layout `cfg.parallel`, checked before any process group is created; rank 0
    alone writes the config, the wandb run and the console progress.
    """
    with Trainer(cfg, resume) as trainer:
        return trainer.train()


class Trainer:
    """One run: its engine, data, checkpoints and metrics, built by the constructor (checks
    first, then the run directory's lock on the main rank, then the process group), released
    by `close` (or the `with` block)."""

    def __init__(self, cfg: Config, resume: bool | str = False) -> None:
        self.t0 = time.perf_counter()
        self.cfg, t = cfg, cfg.train
        self.device = resolve_device(t.device)  # refused first if this torch cannot use it
        self.env = env = LaunchEnv.from_env()
        self.kind = engine_kind(cfg, env.world)
        self.layout = None
        if self.kind != "local":
            from parallel.layout import Layout

            self.layout = Layout.create(
                cfg.parallel, env.world, cfg.model, cfg.attention, t.seq_len
            )
        self.manifest = check_data(cfg)
        self.run_dir = Path(t.run_dir)
        self._exit = ExitStack()
        try:
            if env.is_main:  # one run per run directory, after the checks of its input
                self._exit.enter_context(RunLock(self.run_dir))
            self._start_process_group()
            self._build(resume_mode(resume))
        except BaseException:
            self._exit.close()
            raise

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the metrics, release the layout's and the process group this run made."""
        self._exit.close()

    # ---- the algorithm -----------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Step until train.steps or a stop, validating, logging and checkpointing on the way."""
        t, result, ckpt = self.cfg.train, self.result, self.ckpt
        with self._guards() as stop:
            while result.steps < t.steps:
                t_start = time.perf_counter()
                self.current_step = result.steps + 1
                hang_injection(self.current_step, self.env.rank, self.env.world)
                micro_batches = [next(self.batches) for _ in range(t.grad_accum)]
                data_s = time.perf_counter() - t_start
                stats = self.engine.train_step(micro_batches, step=result.steps)
                step = result.record(stats)
                if stats.skipped:
                    log.warning("step %d: loss %s, update skipped", step, stats.loss)
                due = t.eval_every and step % t.eval_every == 0 and step < t.steps
                val_s = _timed(self.validate) if due else 0.0
                diverged = 0 < t.max_nan_skips <= result.nan_streak
                saved = (ckpt.should_save(step) and step < t.steps) or diverged
                save_s = _timed(self.save) if saved else 0.0
                self.meter.add(stats, data_s, time.perf_counter() - t_start - val_s, save_s)
                self._report(step, stats, force=diverged)
                if diverged:
                    ckpt.finalize()  # its checkpoint is committed before the run stops
                    raise NonFiniteLossError(self._divergence(step))
                fault_injection(step, self.env.rank, self.env.world, self.run_dir)
                if stop.agreed() and step < t.steps:
                    if not saved:
                        self.save()
                    log.warning("stopped by %s after step %d", stop.signal_name or "a peer", step)
                    result.preempted = True
                    break
            if not result.preempted:
                self.validate()
                if result.start_step < result.steps or not ckpt.complete_steps():
                    self.save()
            ckpt.finalize()  # commits a checkpoint still being written (checkpoint.async_save)
        result.seconds = time.perf_counter() - self.t0
        self.metrics.summary(
            {
                "final/val_loss": result.val_loss,
                "final/train_loss_last10": result.mean_loss(first=False),
                "final/steps": result.steps,
                "final/tokens": result.tokens,
            }
        )
        return result

    def validate(self) -> None:
        # Evaluation traffic is not the training step's.
        traffic = self.meter.traffic
        with traffic.paused() if traffic is not None else nullcontext():
            val_loss = evaluate(self.engine, self.val_batches)
        self.result.val_history.append((self.result.steps, val_loss))
        self.metrics.log(self.result.steps, {"val/loss": val_loss})

    def save(self) -> None:
        """Checkpoint every Stateful of the run as step `result.steps` (collective)."""
        state: dict[str, Any] = {name: obj.state_dict() for name, obj in self.stateful.items()}
        state |= {"engine_kind": self.kind, "tokenizer_sha256": self._tokenizer_sha()}
        self.ckpt.save(self.result.steps, state, self.config_dict, meta={"engine": self.kind})
        if self.env.is_main:
            prune_engine_checkpoints(self.engine_dir, self.ckpt.complete_steps())

    # ---- building the run --------------------------------------------------------------------

    def _start_process_group(self) -> None:
        if self.layout is None:
            return
        if not dist.is_initialized():
            self._init_process_group()
            self._exit.callback(dist.destroy_process_group)
        self._exit.callback(self.layout.destroy)  # runs first: megatron's groups, then ours

    def _init_process_group(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.env.local_rank)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.env.world > 1:
            timeout = timedelta(minutes=self.cfg.parallel.timeout_minutes)
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process without a launcher (the engines still want a process group)
            from parallel.local_ranks import free_port

            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts a launcher set it
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
            )

    def _build(self, mode: str) -> None:
        cfg, t, env = self.cfg, self.cfg.train, self.env
        self.config_dict = config_to_dict(cfg)
        self.ckpt = CheckpointManager(
            cfg.checkpoint, self.run_dir, env.rank, env.world, env.barrier
        )
        if mode == "no" and self.ckpt.complete_steps():
            raise ValueError(
                f"{self.ckpt.dir} already holds checkpoints (newest step "
                f"{self.ckpt.complete_steps()[-1]}); pass --resume to continue that run, or "
                "choose another train.run_dir"
            )
        seed_everything(t.seed)
        self.engine = engine = build_engine(cfg, self.kind, self.layout, self.device)
        self.engine_dir = engine.checkpoint_dir = self.ckpt.dir / "engine"
        groups: Any = getattr(engine, "groups", None)
        dp_rank, dp_size = (0, 1) if self.layout is None else (groups.dp_rank, self.layout.dp)
        self._log_layout(groups)
        etc = cfg.attention.etc_tokens  # slots for the model's learned ETC tokens
        self.stream = build_train_stream(
            cfg.data, t.seq_len, t.micro_batch_size, dp_rank, dp_size, t.seed, etc
        )
        self.val_batches = build_val_batches(
            cfg.data, t.seq_len, t.micro_batch_size, t.eval_batches, etc
        )
        self.result = TrainResult(run_dir=str(self.run_dir))
        # Where this process's RNG states belong: restored as saved only at the same place.
        rng = RngState(f"rank {env.rank} of {env.world}, {self.layout}")
        self.stateful: dict[str, Stateful] = {
            "engine": engine,
            "data": self.stream,
            "rng": rng,
            "progress": self.result,
        }
        self._restore(mode)
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(
            cfg.logging if env.is_main else replace(cfg.logging, wandb_mode="disabled"),
            self.run_dir, self.config_dict, resume_id=self.result.wandb_run_id,
            console=env.is_main,
        )  # fmt: skip
        self._exit.callback(self.metrics.finish)
        self.result.wandb_run_id, self.result.wandb_dir = self.metrics.run_id, self.metrics.run_dir
        self.meter = StepMeter.create(
            cfg.model, cfg.attention, t.seq_len, t.micro_batch_size * t.grad_accum,
            cfg.logging.peak_tflops, self.device, env.world, dp_size,
            getattr(engine, "traffic", None),
        )  # fmt: skip
        self._log_start()
        self.batches: Iterator[dict[str, torch.Tensor]] = iter(self.stream)
        self.current_step = self.result.steps + 1  # the step a failed collective is reported in

    def _restore(self, mode: str) -> None:
        """Load the newest checkpoint into every Stateful (any layout for model-space
        engine states), or say why the run starts from step 0."""
        state = self.ckpt.load_latest(self.config_dict) if mode != "no" else None
        if state is None:
            if mode != "no":
                level = logging.INFO if mode == "auto" else logging.WARNING
                log.log(level, "--resume: no complete checkpoint in %s; starting from step 0",
                        self.ckpt.dir)  # fmt: skip
            return
        missing = sorted(set(self.stateful) - set(state))
        if missing:
            raise ValueError(
                f"the checkpoint in {self.ckpt.dir} has no {', '.join(missing)} state: it was "
                "written by an earlier halotron, before the run state was Stateful objects; "
                "resume it with that version, or start a new run in another train.run_dir"
            )
        if state["tokenizer_sha256"] != self._tokenizer_sha():
            raise ValueError(
                f"the checkpoint in {self.ckpt.dir} was trained with another tokenizer (sha256 "
                f"{state['tokenizer_sha256'][:12]}...) than {self.cfg.data.path} holds "
                f"({self._tokenizer_sha()[:12]}...); resume with the data it was trained on"
            )
        saved_kind = state["engine_kind"]
        if (saved_kind == "deepspeed") != (self.kind == "deepspeed"):
            raise ValueError(
                f"the checkpoint in {self.ckpt.dir} was written by the {saved_kind} engine; this "
                f"run uses the {self.kind} engine, which cannot read it (DeepSpeed's checkpoints "
                f"are its own): resume with train.engine={saved_kind}"
            )
        order = self.stream.state_dict()["order"]
        state["data"] = self.ckpt.data_state_for(state, order)  # re-split for another dp
        for name, obj in self.stateful.items():
            obj.load_state_dict(state[name])
        log.info("resuming from step %d of %d", self.result.steps, self.cfg.train.steps)

    def _tokenizer_sha(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    # ---- what the run shows ------------------------------------------------------------------

    @contextmanager
    def _guards(self) -> Iterator[GracefulStop]:
        """Progress bar, signals that stop every rank after the same step, and collectives
        that name their group when a peer fails."""
        cfg, groups = self.cfg, getattr(self.engine, "groups", None)
        watch = name_failed_collectives(
            groups, cfg.parallel.timeout_minutes, lambda: self.current_step
        )
        self.bar = tqdm(
            total=cfg.train.steps, initial=self.result.steps, desc="train", unit="step",
            disable=not (cfg.logging.progress_bar and self.env.is_main), dynamic_ncols=True,
        )  # fmt: skip
        self.postfix: dict[str, str] = {}
        try:
            with logging_redirect_tqdm(), GracefulStop() as stop, watch:
                yield stop
        finally:
            self.bar.close()

    def _report(self, step: int, stats: StepStats, force: bool) -> None:
        """Progress bar every step; metrics every logging.log_every steps, the first and last."""
        self.bar.update(1)
        self.postfix["loss"] = f"{stats.loss:.3f}"
        if step % self.cfg.logging.log_every == 0 or step in (1, self.cfg.train.steps) or force:
            logged = self.meter.flush() | {"train/skipped_steps": self.result.skipped_steps}
            data = {f"data/{k}": v for k, v in self.stream.stats().items()}
            self.metrics.log(step, logged | data)
            self.postfix["tok/s"] = f"{logged['train/tokens_per_s']:,.0f}"
            self.postfix["mfu"] = f"{100 * logged['perf/mfu']:.2f}%"
            self.postfix["skipped"] = str(self.result.skipped_steps)
        self.bar.set_postfix(self.postfix)

    def _divergence(self, step: int) -> str:
        streak, limit = self.result.nan_streak, self.cfg.train.max_nan_skips
        return (
            f"stopped at step {step}: the training loss was NaN or Inf in {streak} consecutive "
            f"steps ({step - streak + 1}-{step}, train.max_nan_skips={limit}); each was "
            f"skipped without an update, so the checkpoint of step {step} holds the parameters "
            f"after step {step - streak}. Lower optim.lr (or lengthen schedule.warmup_steps) "
            "and --resume, or start over"
        )

    def _log_layout(self, groups: Any) -> None:
        if self.layout is None:
            return
        lay, env = self.layout, self.env
        log.info(
            "rank %d of %d: %s engine, layout tp=%d pp=%d cp=%d dp=%d%s, coordinates tp %d pp %d "
            "cp %d dp %d", env.rank, env.world, self.kind, lay.tp, lay.pp, lay.cp, lay.dp,
            " sequence_parallel" if lay.sequence_parallel else "",
            groups.tp_rank, groups.pp_rank, groups.cp_rank, groups.dp_rank,
        )  # fmt: skip

    def _log_start(self) -> None:
        cfg = self.cfg
        if self.env.is_main:
            # ZeRO-3 leaves each parameter empty outside its forward; ds_numel is its size.
            params = self.engine.model.parameters()
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            log.info(
                "model %.2fM parameters%s on %s; data %s (%s train tokens, vocab %d)",
                n_params / 1e6, "" if self.layout is None else " on rank 0", self.device,
                cfg.data.path, f"{self.manifest['splits']['train']['tokens']:,}",
                self.manifest["tokenizer"]["vocab_size"],
            )  # fmt: skip
        if self.metrics.run is not None and cfg.logging.pattern_picture and self.result.steps == 0:
            cp = 1 if self.layout is None else self.layout.cp
            picture = render_run_pattern(
                cfg.model, cfg.attention, cfg.train.seq_len, cp, cfg.optim.dtype.itemsize,
                self.run_dir / "pattern.png",
            )  # fmt: skip
            self.metrics.log_image("pattern/attention", picture, step=0)


def _timed(work: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0
