"""The training loop: build the run, then step, log, validate and checkpoint.

    from train.config import load_config
    from train.loop import train
    result = train(load_config("configs/demo.yaml", ["train.steps=20"]), resume=False)

Usually started through `python -m train --config configs/demo.yaml [--resume]` (or a launcher,
docs/launch.md). The loop only orchestrates; the math lives in the model and the engine, the
data in the stream, the files in the checkpoint manager and the metrics logger. Engines
(`train.engine`): LocalEngine (one process), MegatronEngine (tp/pp/cp/dp) or DeepSpeedEngine
(ZeRO over dp x cp), whose own checkpoint (DeepSpeed's) is written next to the loop's, under
`<checkpoint dir>/engine/step_N/`, before the loop's checkpoint of step N is committed.
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
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.loader import build_train_stream, build_val_batches
from parallel.collective_timeout import name_failed_collectives
from train.checkpoint import CheckpointManager
from train.config import Config, config_to_dict, save_config
from train.engine import NonFiniteLossError
from train.engine_choice import (
    ExternalCheckpoint,
    build_engine,
    engine_kind,
    engine_tag,
    prune_engine_checkpoints,
)
from train.evaluate import evaluate
from train.metrics import MetricsLogger
from train.preemption import GracefulStop, fault_injection, hang_injection
from train.run_setup import (
    LaunchEnv,
    check_data,
    resolve_device,
    resume_mode,
    rng_state,
    seed_everything,
    set_rng_state,
)
from train.sharded_state import ShardedEngine
from train.step_metrics import StepMeter, render_run_pattern

__all__ = ["train", "TrainResult"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did; losses cover the whole run, resumed parts included."""

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
    wandb_dir: str | None = None
    run_dir: str = ""
    preempted: bool = False
    """Stopped early by SIGTERM / SIGUSR1 after writing a checkpoint of `steps`."""

    @property
    def val_loss(self) -> float | None:
        return self.val_history[-1][1] if self.val_history else None

    def mean_loss(self, first: bool, n: int = 10) -> float:
        window = self.losses[:n] if first else self.losses[-n:]
        return sum(window) / len(window) if window else float("nan")


def train(cfg: Config, resume: bool | str = False) -> TrainResult:
    """Run (or continue, with `resume`: a bool or one of RESUME_MODES) the training of `cfg`.

    The engine is `engine_kind`: by default the single-process LocalEngine for one process,
    and the Megatron-core engine under torchrun (WORLD_SIZE > 1) or with any parallel degree
    > 1, on the layout `cfg.parallel`, checked before any process group is created; rank 0
    alone writes the config, the wandb run and the console progress.
    """
    t0 = time.perf_counter()
    targs = cfg.train
    env = LaunchEnv.from_env()
    kind = engine_kind(cfg, env.world)
    if kind == "local" and targs.engine == "auto" and resume_mode(resume) != "no":
        if CheckpointManager(cfg.checkpoint, targs.run_dir).saved_engine() == "megatron":
            kind = "megatron"  # its checkpoint continues on a one-rank Megatron layout
    layout = None
    if kind != "local":
        from parallel.layout import Layout

        layout = Layout.create(cfg.parallel, env.world, cfg.model, cfg.attention, targs.seq_len)
        if kind == "deepspeed":
            from train.deepspeed_config import deepspeed_refusal

            reason = deepspeed_refusal(layout.pp)
            if reason is not None:
                raise ValueError(reason)
    manifest = check_data(cfg)
    run_dir = Path(targs.run_dir)
    config_dict = config_to_dict(cfg)
    device = resolve_device(targs.device)
    own_group = False
    if layout is not None and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(env.local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if env.world > 1:
            timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process without a launcher (the engines still want a process group)
            from parallel.local_ranks import free_port

            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts a launcher set it
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
            )
        own_group = True
    mode = resume_mode(resume)
    try:
        return _train(cfg, mode, env, kind, layout, manifest, run_dir, config_dict, device, t0)
    finally:
        if layout is not None:
            layout.destroy()
        if own_group:
            dist.destroy_process_group()


def _train(cfg, mode, env, kind, layout, manifest, run_dir, config_dict, device, t0) -> TrainResult:
    targs = cfg.train
    ckpt = CheckpointManager(cfg.checkpoint, run_dir, env.rank, env.world, env.barrier)
    if mode == "no" and ckpt.complete_steps():
        raise ValueError(
            f"{ckpt.dir} already holds checkpoints (newest step {ckpt.complete_steps()[-1]}); "
            "pass --resume to continue that run, or choose another train.run_dir"
        )
    engine_dir = ckpt.dir / "engine"
    # Where this process's RNG states belong: restored as saved only at the same place.
    rng_place = f"rank {env.rank} of {env.world}, {layout}"

    seed_everything(targs.seed)
    engine = build_engine(cfg, kind, layout, device)
    dp_rank, dp_size = 0, 1
    # ZeRO-3 leaves each parameter empty outside its forward; ds_numel is its full size.
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.model.parameters())
    if layout is not None:
        groups = engine.groups  # type: ignore[attr-defined]
        dp_rank, dp_size = groups.dp_rank, layout.dp
        log.info(
            "rank %d of %d: %s engine, layout tp=%d pp=%d cp=%d dp=%d%s, coordinates tp %d pp %d "
            "cp %d dp %d", env.rank, env.world, kind, layout.tp, layout.pp, layout.cp, layout.dp,
            " sequence_parallel" if layout.sequence_parallel else "",
            groups.tp_rank, groups.pp_rank, groups.cp_rank, groups.dp_rank,
        )  # fmt: skip
    stream = build_train_stream(
        cfg.data, targs.seq_len, targs.micro_batch_size, dp_rank, dp_size, seed=targs.seed
    )
    val_batches = build_val_batches(
        cfg.data, targs.seq_len, targs.micro_batch_size, targs.eval_batches
    )
    result = TrainResult(run_dir=str(run_dir))
    resume_id = None
    state = ckpt.load_latest(config_dict) if mode != "no" else None
    if state is not None:
        if state["tokenizer_sha256"] != manifest["tokenizer"]["sha256"]:
            raise ValueError(
                f"the checkpoint in {ckpt.dir} was trained with another tokenizer (sha256 "
                f"{state['tokenizer_sha256'][:12]}...) than {cfg.data.path} holds "
                f"({manifest['tokenizer']['sha256'][:12]}...); resume with the data it was "
                "trained on"
            )
        if ("engine_tag" in state) != isinstance(engine, ExternalCheckpoint):
            saved = state["config"].get("train", {}).get("engine", "auto")
            raise ValueError(
                f"the checkpoint in {ckpt.dir} was written with train.engine={saved}; this run "
                f"uses the {kind} engine, which cannot read it: resume with train.engine={saved}"
            )
        saved_kind = state.get("engine_kind", kind)
        if saved_kind != kind:
            raise ValueError(
                f"the checkpoint in {ckpt.dir} was written by the {saved_kind} engine; this run "
                f"uses the {kind} engine, which cannot read it: resume with "
                f"train.engine={saved_kind}"
            )
        if isinstance(engine, ShardedEngine):  # any layout: docs/checkpoints.md
            engine.load_sharded_state_dict(state["engine"])
        else:
            engine.load_state_dict(state["engine"])
        if isinstance(engine, ExternalCheckpoint):
            engine.load_checkpoint(engine_dir, state["engine_tag"])
        stream.load_state_dict(ckpt.data_state_for(state, stream.state_dict()["order"]))
        set_rng_state(state["rng"], rng_place)
        resume_id = state["wandb_run_id"]
        result.start_step = result.steps = state["step"]
        result.losses = list(state["losses"])
        result.val_history = [tuple(v) for v in state["val_history"]]  # type: ignore[misc]
        result.tokens = state["tokens"]
        result.skipped_steps = state.get("skipped_steps", 0)
        log.info("resuming from step %d of %d", result.steps, targs.steps)
    elif mode == "auto":
        log.info("--resume auto: no complete checkpoint in %s; starting from step 0", ckpt.dir)
    elif mode == "yes":
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", ckpt.dir)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
    metrics = MetricsLogger(
        cfg.logging if env.is_main else replace(cfg.logging, wandb_mode="disabled"),
        run_dir,
        config_dict,
        resume_id=resume_id,
        console=env.is_main,
    )
    result.wandb_dir = metrics.run_dir
    if env.is_main:
        log.info(
            "model %.2fM parameters%s on %s; data %s (%s train tokens, vocab %d)",
            n_params / 1e6,
            "" if layout is None else " on rank 0",
            device,
            cfg.data.path,
            f"{manifest['splits']['train']['tokens']:,}",
            manifest["tokenizer"]["vocab_size"],
        )

    def save() -> None:
        extra = {}
        if isinstance(engine, ExternalCheckpoint):  # written before the loop's commit
            engine.save_checkpoint(engine_dir, engine_tag(result.steps))
            extra["engine_tag"] = engine_tag(result.steps)
        payload = {
            **extra,
            "engine": (
                engine.sharded_state_dict()
                if isinstance(engine, ShardedEngine)
                else engine.state_dict()
            ),
            "engine_kind": kind,
            "data": stream.state_dict(),
            "rng": rng_state(rng_place),
            "wandb_run_id": metrics.run_id,
            "tokenizer_sha256": manifest["tokenizer"]["sha256"],
            "losses": result.losses,
            "val_history": result.val_history,
            "tokens": result.tokens,
            "skipped_steps": result.skipped_steps,
        }
        ckpt.save(result.steps, payload, config_dict, meta={"engine": kind})
        if isinstance(engine, ExternalCheckpoint) and env.is_main:
            prune_engine_checkpoints(engine_dir, ckpt.complete_steps())

    meter = StepMeter.create(
        cfg.model, cfg.attention, targs.seq_len, targs.micro_batch_size * targs.grad_accum,
        cfg.logging.peak_tflops, device, env.world, dp_size, getattr(engine, "traffic", None),
    )  # fmt: skip
    if metrics.run is not None and cfg.logging.pattern_picture and result.start_step == 0:
        cp = 1 if layout is None else layout.cp
        picture = render_run_pattern(
            cfg.model, cfg.attention, targs.seq_len, cp, cfg.optim.dtype.itemsize,
            run_dir / "pattern.png",
        )  # fmt: skip
        metrics.log_image("pattern/attention", picture, step=result.steps)

    def validate() -> None:
        # Evaluation traffic is not the training step's.
        with meter.traffic.paused() if meter.traffic is not None else nullcontext():
            val_loss = evaluate(engine, val_batches)
        result.val_history.append((result.steps, val_loss))
        metrics.log(result.steps, {"val/loss": val_loss})

    batches = iter(stream)
    bar = tqdm(
        total=targs.steps,
        initial=result.steps,
        desc="train",
        unit="step",
        disable=not (cfg.logging.progress_bar and env.is_main),
        dynamic_ncols=True,
    )
    postfix: dict[str, str] = {}
    nan_streak = 0
    groups = getattr(engine, "groups", None)
    current_step = result.steps + 1  # the step a failed collective is reported in
    watch = name_failed_collectives(groups, cfg.parallel.timeout_minutes, lambda: current_step)
    try:
        with logging_redirect_tqdm(), GracefulStop() as stop, watch:
            while result.steps < targs.steps:
                t_start = time.perf_counter()
                current_step = result.steps + 1
                hang_injection(current_step, env.rank, env.world)
                micro_batches = [next(batches) for _ in range(targs.grad_accum)]
                data_s = time.perf_counter() - t_start
                stats = engine.train_step(micro_batches, step=result.steps)
                result.steps += 1
                step = result.steps
                result.losses.append(stats.loss)
                result.tokens += stats.n_tokens
                result.skipped_steps += stats.skipped
                nan_streak = nan_streak + 1 if stats.skipped else 0
                if stats.skipped:
                    log.warning("step %d: loss %s, update skipped", step, stats.loss)
                val_s = 0.0
                if targs.eval_every and step % targs.eval_every == 0 and step < targs.steps:
                    t_val = time.perf_counter()
                    validate()
                    val_s = time.perf_counter() - t_val
                diverged = 0 < targs.max_nan_skips <= nan_streak
                saved = (ckpt.should_save(step) and step < targs.steps) or diverged
                save_s = 0.0
                if saved:
                    t_save = time.perf_counter()
                    save()
                    save_s = time.perf_counter() - t_save
                meter.add(stats, data_s, time.perf_counter() - t_start - val_s, save_s)
                bar.update(1)
                postfix["loss"] = f"{stats.loss:.3f}"
                if step % cfg.logging.log_every == 0 or step in (1, targs.steps) or diverged:
                    logged = meter.flush() | {"train/skipped_steps": result.skipped_steps}
                    metrics.log(step, logged | {f"data/{k}": v for k, v in stream.stats().items()})
                    postfix["tok/s"] = f"{logged['train/tokens_per_s']:,.0f}"
                    postfix["mfu"] = f"{100 * logged['perf/mfu']:.2f}%"
                    postfix["skipped"] = str(result.skipped_steps)
                bar.set_postfix(postfix)
                if diverged:
                    ckpt.finalize()  # its checkpoint is committed before the run stops
                    raise NonFiniteLossError(
                        f"stopped at step {step}: the training loss was NaN or Inf in "
                        f"{nan_streak} consecutive steps ({step - nan_streak + 1}-{step}, "
                        f"train.max_nan_skips={targs.max_nan_skips}); each was skipped without "
                        f"an update, so the checkpoint of step {step} holds the parameters "
                        f"after step {step - nan_streak}. Lower optim.lr (or lengthen "
                        "schedule.warmup_steps) and --resume, or start over"
                    )
                fault_injection(step, env.rank, env.world, run_dir)
                if stop.agreed() and step < targs.steps:
                    if not saved:
                        save()
                    log.warning("stopped by %s after step %d", stop.signal_name or "a peer", step)
                    result.preempted = True
                    break
            if not result.preempted:
                validate()
                if result.start_step < result.steps or not ckpt.complete_steps():
                    save()
            ckpt.finalize()  # commits a checkpoint still being written (checkpoint.async_save)
        result.seconds = time.perf_counter() - t0
        metrics.summary(
            {
                "final/val_loss": result.val_loss,
                "final/train_loss_last10": result.mean_loss(first=False),
                "final/steps": result.steps,
                "final/tokens": result.tokens,
            }
        )
    finally:
        bar.close()
        metrics.finish()
    return result
