"""The training run of any objective, top to bottom: validate, build, loop, evaluate,
checkpoint, export.

``run(config, objective_cls)`` is what ``python -m sft_jax.train``, ``reward``, ``dpo`` and
``ppo`` call (through ``sft_jax.cli.training_command``). Its order matters:

1. Everything a user can get wrong is checked before the run directory is touched: the
   config (already typed), the mesh against the devices, the batch against the mesh, the
   model source, the tokenizer and the data files. A mistake costs one line on stderr and
   leaves no half-written run directory.
2. The train state is born sharded (``core.step.init_state``), or restored onto this mesh
   from the newest complete checkpoint (``train.resume=auto``), whatever mesh wrote it.
   The objective's frozen parameters, if any, are placed on the mesh beside it.
3. The loop dispatches one jitted step per batch and never waits on the device except
   every ``log_every`` steps (metrics), at checkpoints and at evaluations. Before each
   update it calls the objective's ``rollout`` hook (identity, except for PPO). Throughput
   is timed per logging window after that wait (``StepClock``); the first step of a start,
   which compiles, is timed on its own.
4. SIGTERM (spot preemption) sets a flag; the loop saves the current step, waits for the
   write, and returns. Non-finite steps are skipped on device; too many in a row stop the
   run with ``NonFiniteError`` before anything newer than the last good checkpoint is saved.
5. At the end: final checkpoint, the objective's evaluation, its export, report.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

from sft_jax.adapters import objective as adapters
from sft_jax.core import checkpoint as ckpt
from sft_jax.runtime import distributed
from sft_jax.runtime import faults, runlock
from sft_jax.core import mesh as shd
from sft_jax.config import Config, ConfigError
from sft_jax.core import step as core_step
from sft_jax.core.setup import (check_same_model, checkpoint_model_config, enable_compilation_cache,
                                model_and_tokenizer, resume_source)
from sft_jax.data import resolve_template
from sft_jax.runtime.paths import download_outputs, is_remote, run_dirs, upload_outputs
from sft_jax.core import metrics as core_metrics
from sft_jax.core.metrics import MetricsLogger, mfu
from sft_jax.core.optimizer import make_optimizer
from sft_jax.core.report import write_report

class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps with non-finite loss or gradients."""


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    step: int  # optimizer steps done (the next step to run)
    status: str  # "done" | "preempted"
    final_loss: Optional[float] = None
    eval: dict = dataclasses.field(default_factory=dict)
    wall_time_s: float = 0.0


def run(config: Config, objective_cls: Callable, *, devices=None, batch_transform: Callable | None = None,
        memory_stats: Callable | None = None) -> RunResult:
    """Train ``objective_cls(config, model_cfg, tokenizer, hf_dir)`` (an ``Objective``) as
    ``config`` says. ``devices`` restricts the mesh (default: all);
    ``batch_transform(step, numpy_batch) -> numpy_batch`` is a test hook (e.g. a NaN);
    ``memory_stats() -> dict | None`` reads device memory for the log (default:
    ``sft_jax.core.metrics.device_memory``, looked up at each log)."""
    t_start = time.perf_counter()
    distributed.initialize(config.distributed)
    enable_compilation_cache(config.train.compilation_cache)
    # one run per output directory: a second one refuses here, before it reads or writes anything
    with runlock.hold(config.run.output_dir, run_dirs(config)[0], enabled=jax.process_index() == 0):
        return _run(config, objective_cls, devices, batch_transform, memory_stats, t_start)


def _run(config: Config, objective_cls: Callable, devices, batch_transform, memory_stats, t_start: float) -> RunResult:
    main = jax.process_index() == 0

    # 1. validate and build everything before the run directory exists --------------------
    mesh = shd.make_mesh(config.mesh, devices)
    shd.check_batch_fits(mesh, config.micro_batch_size())
    source = resume_source(config)
    model_cfg, tokenizer, hf_dir = model_and_tokenizer(config)
    # data.template=auto made concrete (the tokenizer's own template or the built-in) for the data and the export
    config = dataclasses.replace(config, data=resolve_template(config.data, tokenizer))
    if main and config.run.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"run.wandb_project={config.run.wandb_project!r} needs wandb: pip install 'sft_jax[wandb]'")
    if config.train.max_new_tokens >= model_cfg.max_position_embeddings:  # scratch: already refused by the config
        raise ConfigError(f"train.max_new_tokens={config.train.max_new_tokens} leaves no room for a prompt in "
                          f"the model's n_positions={model_cfg.max_position_embeddings}; it must be smaller")
    kv_note = shd.check_heads_split(mesh, model_cfg)
    window = getattr(model_cfg, "sliding_window", None)  # HF's name; full attention when absent
    if window is not None and window < config.data.max_length:
        raise ConfigError(f"the model's sliding_window={window} is shorter than data.max_length="
                          f"{config.data.max_length}; only windows that cover the row are supported "
                          f"(set data.max_length <= {window})")
    if source is not None:
        check_same_model(source, model_cfg)
    if main and kv_note:
        print(f"sft_jax: {kv_note}", file=sys.stderr, flush=True)
    objective = adapters.wrap(config, objective_cls(config, model_cfg, tokenizer, hf_dir))
    if source is not None:  # before the restore, whose shapes would not match another kind of run
        saved = checkpoint_model_config(source, "train_state")
        if "lora_base" in saved and not adapters.enabled(config):
            raise ConfigError(f"checkpoint {source} holds LoRA adapters; set model.lora.rank (or start a new "
                              f"run directory)")
        objective.check_resume(source, saved)
    data = objective.build_data()
    iterator = data.iterator
    total_steps = config.train.steps or max(1, math.ceil(config.train.epochs * iterator.steps_per_epoch))
    tx, schedule = make_optimizer(config.optim, total_steps)
    tx = objective.optimizer(tx)
    abstract, shardings = core_step.state_shardings(objective.abstract_params(), tx, mesh)

    start_step = 0
    if source is not None:
        restored = ckpt.restore(source, params_target=abstract.params, opt_state_target=abstract.opt_state)
        train_state = restored["train_state"] or {}
        start_step = int(train_state.get("step", restored["step"]))
        state = core_step.state_from_restored(restored["params"], restored["opt_state"], train_state, shardings)
        iterator.restore(train_state.get("data", {"step": start_step}))  # DataError: buckets at another batch
        if main:
            print(f"sft_jax: resuming from step {start_step} of {source}", file=sys.stderr, flush=True)
            changes = batch_size_changes(iterator)
            if changes and iterator.batch_size_changes[-1][0] == start_step:
                print(f"sft_jax: {changes[-1]}; the data continues from the next unseen row", file=sys.stderr,
                      flush=True)
    else:
        params = objective.initial_params(shardings.params)
        state = core_step.init_state(objective.init_params, tx, shardings, seed=config.train.seed, params=params)
    frozen = objective.frozen_params(mesh)

    # 2. the run directory -----------------------------------------------------------------
    out, checkpoint_root = run_dirs(config)
    remote = config.run.output_dir if is_remote(config.run.output_dir) else None
    if main:
        if remote and source is not None:
            download_outputs(remote, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.to_yaml())
        (out / "data_report.md").write_text(data.report_md or "")
    manager = ckpt.make_manager(checkpoint_root, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    logger = MetricsLogger(out, enabled=main, total_steps=total_steps, start_step=start_step,
                           wandb_project=config.run.wandb_project, wandb_name=config.run.wandb_name,
                           wandb_config=config.to_dict())
    runner = Loop(config, mesh, objective, tx, schedule, shardings, state, frozen, data, manager, logger,
                  total_steps, batch_transform, memory_stats)
    try:
        with sigterm_flag() as preempted:
            result = runner.train(start_step, preempted)
        iterator.close()
        if result.status == "done":
            result.eval = runner.final_outputs(out, data.report_md, t_start)
    finally:
        iterator.close()
        logger.close()
        manager.close()
    if main and remote:
        upload_outputs(out, remote)
        print(f"sft_jax: copied logs, report and export from {out} to {remote}", file=sys.stderr, flush=True)
    result.output_dir = out
    result.wall_time_s = time.perf_counter() - t_start
    return result


@contextlib.contextmanager
def sigterm_flag():
    """A one-element list that turns True on SIGTERM (the loop checks it between steps)."""
    flag = [False]

    def handler(signum, frame):
        flag[0] = True

    if jax.process_count() > 1:
        # JAX's preemption notifier owns SIGTERM and agrees on one step with every host
        # (distributed.preemption_requested); a Python handler would replace it.
        yield flag
        return
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler, no preemption support
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class StepClock:
    """Wall time of the training steps in each logging window, read once the device has done them.

    The loop dispatches steps ahead of the device, so a window closes only after the log's
    host sync has returned: its time then covers its own steps' device time and none of the
    next window's. The first step of a start (its compilation, the objective's first rollout
    or reference pass, and the step itself) is waited for and timed on its own,
    ``first_step_s``, outside every window. Evaluations and checkpoint writes during training
    are left out of the window they fall into (the steps dispatched before them stay in it)."""

    def __init__(self):
        self.first_step_s: Optional[float] = None
        self._first_step_logged = False
        self._start = 0.0  # when the current window's steps could start running
        self._start_step = 0
        self._left_out = 0.0  # seconds of evaluation and saving inside the current window

    def first_step_done(self, t_batch: float, outputs, step: int) -> None:
        """The start's first step was dispatched; wait for it, and open the first window."""
        jax.block_until_ready(outputs)
        self._start = time.perf_counter()
        self.first_step_s = self._start - t_batch
        self._start_step = step

    def close_window(self, step: int) -> tuple[float, int]:
        """(seconds, steps) of the window ending at ``step``, called after the host sync; the
        next window starts now."""
        now = time.perf_counter()
        seconds, steps = now - self._start - self._left_out, step - self._start_step
        self._start, self._start_step, self._left_out = now, step, 0.0
        return seconds, steps

    def take_first_step_s(self) -> Optional[float]:
        """``first_step_s`` for the first record that is logged, None after it."""
        if self._first_step_logged:
            return None
        self._first_step_logged = True
        return self.first_step_s

    @contextlib.contextmanager
    def left_out(self, state):
        """Time the block and take it out of the current window."""
        jax.block_until_ready(state)  # the steps dispatched before the block belong to the window
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._left_out += time.perf_counter() - t0


class Loop:
    """The loop's state in one place: device state and frozen parameters, iterator,
    checkpoint manager, logger; the objective is asked only for what differs."""

    def __init__(self, config: Config, mesh, objective, tx, schedule, shardings, state, frozen, data, manager,
                 logger: MetricsLogger, total_steps: int, batch_transform, memory_stats: Callable | None = None):
        self.config, self.mesh, self.objective = config, mesh, objective
        self.model_cfg, self.tokenizer = objective.model_cfg, objective.tokenizer
        self.shardings, self.state, self.iterator, self.eval_data = shardings, state, data.iterator, data.eval_data
        self.frozen, frozen_shardings = frozen if frozen is not None else (None, None)
        self.manager, self.logger, self.total_steps = manager, logger, total_steps
        self.batch_transform = batch_transform
        self.memory_stats = memory_stats or (lambda: core_metrics.device_memory())
        self.step_fn = core_step.make_train_step(objective, tx, schedule, mesh=mesh, shardings=shardings,
                                                 n_micro=config.accumulation_steps(),
                                                 max_nonfinite_steps=config.optim.max_nonfinite_steps,
                                                 clip_norm=config.optim.clip_norm, frozen_shardings=frozen_shardings)
        self.eval_fn = core_step.make_eval_step(objective, mesh=mesh, param_shardings=shardings.params,
                                                frozen_shardings=frozen_shardings)
        self.last_loss: Optional[float] = None
        self.last_saved: Optional[int] = None
        self.last_eval: dict = {}

    # --- the loop ----------------------------------------------------------------------
    def train(self, step: int, preempted: list) -> RunResult:
        c = self.config
        G = c.train.global_batch_size
        pending: list[dict] = []
        clock = StepClock()
        if c.train.eval_at_start and step == 0:
            self.evaluate(0)
        while step < self.total_steps:
            if distributed.preemption_requested(step, preempted[0]):
                self.save(step, force=True)
                self.manager.wait_until_finished()
                print(f"sft_jax: SIGTERM: saved step {step} to {self.manager.directory}; exiting", file=sys.stderr)
                return RunResult(Path(), step, "preempted", self.last_loss)
            t_batch = time.perf_counter()
            batch = next(self.iterator)
            # The rollout hook point (PPO: sample and score here, from the current params).
            batch = self.objective.rollout(self, step, batch)
            if self.batch_transform is not None:
                batch = self.batch_transform(step, batch)
            device_batch = core_step.global_batch(batch, self.step_fn.batch_shardings, G)
            self.state, metrics = self.step_fn(self.state, device_batch, self.frozen)
            pending.append(metrics)
            step += 1
            if clock.first_step_s is None:
                clock.first_step_done(t_batch, (self.state, metrics), step)
            last = step == self.total_steps
            if step % c.train.log_every == 0 or last:
                self.log(step, pending, clock, batch["tokens"].shape[1])
                pending = []
            saved = c.checkpoint.every and step % c.checkpoint.every == 0 and not last
            if saved:
                with clock.left_out(self.state):
                    self.save(step)
            faults.after_step(step, bool(saved), self.manager.directory, self.manager.wait_until_finished)
            if c.train.eval_every and step % c.train.eval_every == 0 and not last:
                with clock.left_out(self.state):
                    self.evaluate(step)
        self.save(step, force=True)
        self.manager.wait_until_finished()
        return RunResult(Path(), step, "done", self.last_loss)

    def log(self, step: int, pending: list[dict], clock: StepClock, length: int) -> None:
        host = jax.device_get(pending)  # the only regular host sync
        seconds, n_steps = clock.close_window(step)  # after the sync: the window's steps are done
        self.check_finite(host[-1], step)
        mean = lambda k: float(np.mean([m[k] for m in host]))
        finite_losses = [float(m["loss"]) for m in host if np.isfinite(m["loss"])]
        self.last_loss = float(host[-1]["loss"])
        record = {
            "loss": float(np.mean(finite_losses)) if finite_losses else float("nan"),
            "last_loss": self.last_loss,
            "supervised_tokens": float(host[-1]["supervised_tokens"]),
            "grad_norm": mean("grad_norm"),
            "clip_ratio": mean("clip_ratio"),
            "lr": float(host[-1]["lr"]),
            "nonfinite_total": int(host[-1]["nonfinite_total"]),
            # per-step arrays (already on the host) for `python -m sft_jax.analyze`'s stability study
            "step_loss": [_finite_or_none(m["loss"]) for m in host],
            "step_grad_norm": [_finite_or_none(m["grad_norm"]) for m in host],
            "step_clipped": [bool(m["clip_ratio"] < 1.0) for m in host],
        }
        record.update({name: mean(name) for name in self.objective.metric_names})
        first_step_s = clock.take_first_step_s()
        if first_step_s is not None:
            record["first_step_s"] = first_step_s
        if n_steps:  # throughput of the window's timed steps (not the start's first step)
            timed = host[len(host) - n_steps:]
            record["step_time_s"] = seconds / n_steps
            record["tokens_per_s"] = sum(float(m["tokens"]) for m in timed) / seconds
            record["supervised_tokens_per_s"] = sum(float(m["supervised_tokens"]) for m in timed) / seconds
            rows_tokens = n_steps * self.config.train.global_batch_size * length  # computed, padding included
            util = mfu(rows_tokens / seconds, self.model_cfg.flops_per_token(length), self.mesh.size,
                       self.mesh.devices.flat[0].device_kind)
            if util is not None:
                record["mfu"] = util
        memory = self.memory_stats()
        if memory is None:  # CPU backends keep no device allocator stats: report the process's peak
            import resource

            memory = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        record.update(memory)
        self.logger.log(step, record)

    def check_finite(self, latest: dict, step: int) -> None:
        if bool(latest["nonfinite_tripped"]):
            where = (f"the last good checkpoint is step {self.last_saved} in {self.manager.directory}"
                     if self.last_saved is not None else "no checkpoint was saved")
            raise NonFiniteError(
                f"{self.config.optim.max_nonfinite_steps} consecutive optimizer steps had non-finite loss or "
                f"gradients (by step {step}); stopping without saving: {where}. Lower optim.lr, raise "
                f"optim.clip_norm protection, or inspect the data")

    def save(self, step: int, force: bool = False) -> None:
        if step in self.manager.all_steps():  # e.g. rerunning a finished run: nothing new to save
            return
        counters = jax.device_get({"nonfinite_total": self.state.nonfinite_total,
                                   "nonfinite_run": self.state.nonfinite_run,
                                   "nonfinite_tripped": self.state.nonfinite_tripped})
        self.check_finite(counters, step)
        train_state = {"step": step, "data": self.iterator.state(), "seed": self.config.train.seed,
                       "nonfinite_total": int(counters["nonfinite_total"]),
                       "nonfinite_run": int(counters["nonfinite_run"]), **self.objective.checkpoint_state()}
        ckpt.save(self.manager, step, params=self.state.params, opt_state=self.state.opt_state,
                  model_config=self.model_cfg, tokenizer=self.tokenizer, train_state=train_state, force=force)
        self.objective.on_save(self, step)
        self.last_saved = step

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        """The objective's held-out metrics (``Objective.evaluate``), logged."""
        results = self.objective.evaluate(self, step)
        self.logger.log_eval(step, results)
        self.last_eval = results
        return results

    def held_out_sums(self, batches) -> list[float]:
        """``eval_fn`` over held-out host batches (at most ``train.eval_max_batches``); each of its
        outputs summed over the batches."""
        E, limit = self.config.micro_batch_size(), self.config.train.eval_max_batches
        sums = []
        for i, batch in enumerate(batches):
            if limit and i >= limit:
                break
            device_batch = core_step.global_batch(batch, self.eval_fn.batch_shardings, E)
            sums.append(self.eval_fn(self.state.params, device_batch, self.frozen))
        return [float(sum(x)) for x in zip(*jax.device_get(sums))]

    def host_params(self):
        """Parameters every process can read whole: the sharded ones with one process; with
        several, gathered from all of them (a collective: every process must call this)."""
        if jax.process_count() == 1:
            return self.state.params
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(self.state.params, tiled=True)

    # --- the end --------------------------------------------------------------------------
    def final_outputs(self, out: Path, data_report_md: Optional[str], t_start: float) -> dict:
        results = self.evaluate(self.total_steps)
        main = jax.process_index() == 0
        export_lines = self.objective.export(self, out) if self.config.run.export else []
        if main:
            summary = {"final_loss": self.last_loss, "steps": self.total_steps,
                       "wall_time_s": time.perf_counter() - t_start, **results}
            if batch_size_changes(self.iterator):
                summary["global batch size"] = "; ".join(batch_size_changes(self.iterator))
            report = write_report(out, data_report_md=data_report_md, summary=summary)
            # every path in the form run.output_dir was given (relative to the working directory
            # when it is), so the lines can be pasted into the next command as they are
            lines = [f"checkpoints: {run_dirs(self.config)[1]}", f"report:      {report}", *export_lines]
            print("\n".join(lines), flush=True)
        return results


def _finite_or_none(x) -> Optional[float]:
    return float(x) if np.isfinite(x) else None  # JSON has no NaN


def batch_size_changes(iterator) -> list[str]:
    """'batch size changed at step N (A -> B)' for each resume at another global batch size."""
    changes = getattr(iterator, "batch_size_changes", None) or []
    return [f"batch size changed at step {step} ({old} -> {new})" for step, old, new in changes]
