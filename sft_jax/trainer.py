"""The training run, top to bottom: validate, build, loop, evaluate, checkpoint, export.

``run(config)`` is what ``python -m sft_jax.train`` calls. Its order matters:

1. Everything a user can get wrong is checked before the run directory is touched: the
   config (already typed), the mesh against the devices, the batch against the mesh, the
   model source, the tokenizer and the data files. A mistake costs one line on stderr and
   leaves no half-written run directory.
2. The train state is born sharded (``train_step.init_state``), or restored onto this mesh
   from the newest complete checkpoint (``train.resume=auto``), whatever mesh wrote it.
3. The loop dispatches one jitted step per batch and never waits on the device except
   every ``log_every`` steps (metrics), at checkpoints and at evaluations.
4. SIGTERM (spot preemption) sets a flag; the loop saves the current step, waits for the
   write, and returns. Non-finite steps are skipped on device; too many in a row stop the
   run with ``NonFiniteError`` before anything newer than the last good checkpoint is saved.
5. At the end: final checkpoint, evaluation (loss, perplexity, samples, exact match),
   HF export (self-verifying), report.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

from sft_jax import checkpoint as ckpt
from sft_jax import distributed
from sft_jax import sharding as shd
from sft_jax import train_step as ts
from sft_jax.config import Config, ConfigError
from sft_jax.data import (BatchIterator, build_datasets, chat_template, encode_prompt, eval_batches,
                          report_to_markdown)
from sft_jax.data.demo import demo_tokenizer, exact_match
from sft_jax.data.formats import decode
from sft_jax.metrics import MetricsLogger, device_memory, mfu
from sft_jax.model import GPT2Config
from sft_jax.optim import make_optimizer
from sft_jax.report import write_report


ARCH_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
GENERATE_BATCH = 64  # prompts per generate call (a fixed shape, so it compiles once per prompt length)
# Tests only: "STEP:during_save" SIGKILLs this process right after the async save of STEP
# starts (a torn checkpoint), "STEP:after_save" once it is committed.
TEST_KILL_ENV = "SFT_JAX_TEST_KILL"


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


# --- setup ----------------------------------------------------------------------------

def enable_compilation_cache(directory: Optional[str]) -> None:
    """Persistent XLA cache, so a rerun or resume skips compilation; thresholds lowered so
    small CPU programs are cached too."""
    if directory and jax.default_backend() == "cpu" and jax.device_count() > 1:
        # XLA:CPU (jax 0.10) deadlocks in cross-device collectives of executables loaded from
        # the persistent cache (seen: a resume on a data=4 x fsdp=2 mesh of host devices
        # hangs in its first step). Several CPU devices only exist in tests and trials.
        print("sft_jax: persistent compilation cache off: several CPU devices", file=sys.stderr, flush=True)
        directory = None
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:  # jax opens the cache once per process
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_dirs(config: Config):
    """(local directory for logs, report and export; checkpoint root, local or remote).

    Object stores have no append and no atomic directory rename, which metrics.jsonl and
    the self-verifying export rely on; so with a gs:// output_dir those files are written to
    a local staging directory and copied up (``upload_outputs``), while orbax writes the
    checkpoints to the bucket directly from every process."""
    out = config.run.output_dir
    if not ckpt.is_remote(out):
        return Path(out), Path(out) / "checkpoints"
    name = out.split("://", 1)[1].strip("/").replace("/", "__")
    return Path(config.run.staging_dir).expanduser() / name, ckpt.as_path(out) / "checkpoints"


def upload_outputs(local: Path, remote) -> None:
    """Copy every file under ``local`` to the same place under ``remote`` (overwriting)."""
    from etils import epath

    remote = epath.Path(remote)
    for src in sorted(local.rglob("*")):
        if src.is_file():
            dst = remote / src.relative_to(local).as_posix()
            dst.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(src).copy(dst, overwrite=True)


def download_outputs(remote, local: Path, names=("metrics.jsonl",)) -> None:
    """On a resume from a fresh machine, bring back the files a run appends to."""
    from etils import epath

    for name in names:
        src = epath.Path(remote) / name
        if src.exists() and not (local / name).exists():
            local.mkdir(parents=True, exist_ok=True)
            src.copy(epath.Path(local / name))


def resume_source(config: Config):
    """The checkpoint root to resume from, or None for a fresh start."""
    resume = config.train.resume
    own = run_dirs(config)[1]
    if resume == "never":
        return None
    if resume == "auto":
        return own if ckpt.latest_step(own) is not None else None
    path = ckpt.as_path(resume)
    for candidate in (path / "checkpoints", path):
        if ckpt.is_checkpoint(candidate):
            return candidate
    raise ConfigError(f"train.resume={resume!r}: no complete sft_jax checkpoint there "
                      f"(use auto, never, or a checkpoints directory)")


def model_and_tokenizer(config: Config):
    """(GPT2Config, tokenizer, hf_dir or None), reading no weights."""
    m = config.model
    compute = dict(dtype=m.dtype, remat=m.remat, attention=m.attention, scan_layers=m.scan_layers)
    if m.init_from == "scratch":
        tokenizer = demo_tokenizer(seed=0) if m.tokenizer in (None, "demo") else _load_tokenizer(m.tokenizer)
        cfg = GPT2Config.preset(m.preset, vocab_size=len(tokenizer), n_positions=m.n_positions,
                                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **compute)
        return cfg, tokenizer, None
    from sft_jax import hf

    directory = hf.resolve_dir(m.init_from)
    cfg = hf.read_config(directory, **compute)
    tokenizer = _load_tokenizer(m.tokenizer or str(directory))
    return cfg, tokenizer, directory


def _load_tokenizer(name: str):
    from sft_jax.tokenizer import load_tokenizer

    return load_tokenizer(name)


def _checkpoint_model_config(root: Path) -> dict:
    """The architecture stored with the newest checkpoint (read without touching weights)."""
    import json

    step_dir = root / str(ckpt.latest_step(root))
    for f in sorted((step_dir / "model_config").glob("*")):
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                continue
    return {}


# --- the run ----------------------------------------------------------------------------

def run(config: Config, *, devices=None, batch_transform: Callable | None = None) -> RunResult:
    """Train as ``config`` says. ``devices`` restricts the mesh (default: all);
    ``batch_transform(step, numpy_batch) -> numpy_batch`` is a test hook (e.g. a NaN)."""
    t_start = time.perf_counter()
    distributed.initialize(config.distributed)
    enable_compilation_cache(config.train.compilation_cache)
    main = jax.process_index() == 0

    # 1. validate and build everything before the run directory exists --------------------
    mesh = shd.make_mesh(config.mesh, devices)
    G, M = config.train.global_batch_size, config.micro_batch_size()
    shd.check_batch_fits(mesh, M)
    source = resume_source(config)
    model_cfg, tokenizer, hf_dir = model_and_tokenizer(config)
    if source is not None:
        saved = _checkpoint_model_config(source)
        diff = {k: (saved.get(k), getattr(model_cfg, k)) for k in ARCH_FIELDS if saved.get(k) != getattr(model_cfg, k)}
        if saved and diff:
            raise ConfigError(f"checkpoint {source} holds a different model than model.* describes: {diff}")
    train_ds, eval_ds, data_report = build_datasets(config.data, tokenizer, n_positions=model_cfg.n_positions,
                                                    vocab_size=model_cfg.vocab_size, seed=config.train.seed,
                                                    global_batch_size=G)
    d = config.data
    iterator = BatchIterator(train_ds, global_batch_size=G, seed=config.train.seed, mode=d.batching,
                             max_length=d.max_length, buckets=d.buckets, process_index=jax.process_index(),
                             process_count=jax.process_count(), shuffle=d.shuffle, prefetch=d.prefetch)
    total_steps = config.train.steps or max(1, math.ceil(config.train.epochs * iterator.steps_per_epoch))
    tx, schedule = make_optimizer(config.optim, total_steps)
    abstract, shardings = ts.state_shardings(model_cfg, tx, mesh)

    start_step = 0
    if source is not None:
        restored = ckpt.restore(source, params_target=abstract.params, opt_state_target=abstract.opt_state)
        train_state = restored["train_state"] or {}
        start_step = int(train_state.get("step", restored["step"]))
        state = ts.state_from_restored(restored["params"], restored["opt_state"], train_state, shardings)
        iterator.restore(train_state.get("data", {"step": start_step}))
        if main:
            print(f"sft_jax: resuming from step {start_step} of {source}", file=sys.stderr, flush=True)
    else:
        params = None
        if hf_dir is not None:
            from sft_jax import hf

            _, params = hf.load_hf(hf_dir, shardings=shardings.params, dtype=model_cfg.dtype)
        state = ts.init_state(model_cfg, tx, mesh, shardings, seed=config.train.seed, params=params)

    # 2. the run directory -----------------------------------------------------------------
    out, checkpoint_root = run_dirs(config)
    remote = config.run.output_dir if ckpt.is_remote(config.run.output_dir) else None
    if main:
        if remote and source is not None:
            download_outputs(remote, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.to_yaml())
        (out / "data_report.md").write_text(report_to_markdown(data_report))
    manager = ckpt.make_manager(checkpoint_root, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    logger = MetricsLogger(out, enabled=main, total_steps=total_steps,
                           start_step=start_step)
    runner = _Loop(config, mesh, model_cfg, tokenizer, tx, schedule, shardings, state, iterator, eval_ds,
                   manager, logger, total_steps, batch_transform)
    try:
        with _sigterm_flag() as preempted:
            result = runner.train(start_step, preempted)
        iterator.close()
        if result.status == "done":
            result.eval = runner.final_outputs(out, data_report, t_start)
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
def _sigterm_flag():
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


class _Loop:
    """The loop's state in one place: device state, iterator, checkpoint manager, logger."""

    def __init__(self, config: Config, mesh, model_cfg: GPT2Config, tokenizer, tx, schedule, shardings,
                 state, iterator, eval_ds, manager, logger: MetricsLogger, total_steps: int, batch_transform):
        self.config, self.mesh, self.model_cfg, self.tokenizer = config, mesh, model_cfg, tokenizer
        self.shardings, self.state, self.iterator, self.eval_ds = shardings, state, iterator, eval_ds
        self.manager, self.logger, self.total_steps = manager, logger, total_steps
        self.batch_transform = batch_transform
        t = config.train
        self.step_fn = ts.make_train_step(model_cfg, tx, schedule, mesh=mesh, shardings=shardings,
                                          n_micro=config.accumulation_steps(), loss_chunk=t.loss_chunk,
                                          max_nonfinite_steps=config.optim.max_nonfinite_steps,
                                          clip_norm=config.optim.clip_norm)
        self.eval_fn = ts.make_eval_step(model_cfg, mesh=mesh, shardings=shardings, loss_chunk=t.loss_chunk)
        self.last_loss: Optional[float] = None
        self.last_saved: Optional[int] = None
        self.last_eval: dict = {}

    # --- the loop ----------------------------------------------------------------------
    def train(self, step: int, preempted: list) -> RunResult:
        c = self.config
        G = c.train.global_batch_size
        pending: list[dict] = []
        t_last, step_last = time.perf_counter(), step
        kill_step, _, kill_phase = os.environ.get(TEST_KILL_ENV, "-1:").partition(":")
        if c.train.eval_at_start and step == 0:
            self.evaluate(0)
        while step < self.total_steps:
            if distributed.preemption_requested(step, preempted[0]):
                self.save(step, force=True)
                self.manager.wait_until_finished()
                print(f"sft_jax: SIGTERM: saved step {step} to {self.manager.directory}; exiting", file=sys.stderr)
                return RunResult(Path(), step, "preempted", self.last_loss)
            batch = next(self.iterator)
            if self.batch_transform is not None:
                batch = self.batch_transform(step, batch)
            self.state, metrics = self.step_fn(self.state, shd.global_batch(batch, self.mesh, G))
            pending.append(metrics)
            step += 1
            last = step == self.total_steps
            if step % c.train.log_every == 0 or last:
                now = time.perf_counter()
                self.log(step, pending, now - t_last, step - step_last, batch["tokens"].shape[1])
                pending, t_last, step_last = [], now, step
            if c.checkpoint.every and step % c.checkpoint.every == 0 and not last:
                self.save(step)
                if step == int(kill_step):
                    if kill_phase == "after_save":
                        self.manager.wait_until_finished()
                    os.kill(os.getpid(), signal.SIGKILL)
            if c.train.eval_every and step % c.train.eval_every == 0 and not last:
                self.evaluate(step)
        self.save(step, force=True)
        self.manager.wait_until_finished()
        return RunResult(Path(), step, "done", self.last_loss)

    def log(self, step: int, pending: list[dict], seconds: float, n_steps: int, length: int) -> None:
        host = jax.device_get(pending)  # the only regular host sync
        self.check_finite(host[-1], step)
        mean = lambda k: float(np.mean([m[k] for m in host]))
        tokens = sum(float(m["tokens"]) for m in host)
        supervised = sum(float(m["supervised_tokens"]) for m in host)
        rows_tokens = n_steps * self.config.train.global_batch_size * length  # tokens computed, padding included
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
            "step_time_s": seconds / n_steps,
            "tokens_per_s": tokens / seconds,
            "supervised_tokens_per_s": supervised / seconds,
            # per-step arrays (already on the host) for `python -m sft_jax.analyze`'s stability study
            "step_loss": [_finite_or_none(m["loss"]) for m in host],
            "step_grad_norm": [_finite_or_none(m["grad_norm"]) for m in host],
            "step_clipped": [bool(m["clip_ratio"] < 1.0) for m in host],
        }
        util = mfu(rows_tokens / seconds, self.model_cfg.flops_per_token(length), self.mesh.size,
                   self.mesh.devices.flat[0].device_kind)
        if util is not None:
            record["mfu"] = util
        memory = device_memory()
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
                       "nonfinite_run": int(counters["nonfinite_run"])}
        ckpt.save(self.manager, step, params=self.state.params, opt_state=self.state.opt_state,
                  model_config=self.model_cfg, tokenizer=self.tokenizer, train_state=train_state, force=force)
        self.last_saved = step

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        c, d = self.config, self.config.data
        results: dict = {}
        if self.eval_ds is not None and len(self.eval_ds):
            E = c.micro_batch_size()
            sums = []
            batches = eval_batches(self.eval_ds, batch_size=E, max_length=d.max_length, mode=d.batching,
                                   buckets=d.buckets, process_index=jax.process_index(),
                                   process_count=jax.process_count())
            for i, batch in enumerate(batches):
                if c.train.eval_max_batches and i >= c.train.eval_max_batches:
                    break
                sums.append(self.eval_fn(self.state.params, shd.global_batch(batch, self.mesh, E)))
            nll, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
            results["eval_loss"] = nll / max(count, 1.0)
            results["eval_ppl"] = math.exp(min(results["eval_loss"], 50.0))
            results.update(self.generation_eval(step))
        self.logger.log_eval(step, results)
        self.last_eval = results
        return results

    def generation_eval(self, step: int) -> dict:
        """A few samples into the log, and greedy exact match on held-out prompts."""
        t = self.config.train
        examples = self.eval_ds.examples or []
        n = min(len(examples), max(t.eval_samples, t.exact_match_examples))
        if n == 0:
            return {}
        chosen = examples[:n]
        prompts = [encode_prompt(self.tokenizer, self.config.data, ex) for ex in chosen]
        references = [_last_response(ex) for ex in chosen]
        predictions = self.generate(prompts)
        for i in range(min(t.eval_samples, n)):
            prompt_text = decode(self.tokenizer, prompts[i])
            self.logger.log_text(step, f"sample_{i}", f"{prompt_text}{predictions[i]}\n[reference] {references[i]}")
        if t.exact_match_examples:
            k = min(t.exact_match_examples, n)
            return {"exact_match": exact_match(predictions[:k], references[:k])}
        return {}

    def generate(self, prompts: list[list[int]]) -> list[str]:
        from sft_jax.sampling import generate

        params = self.host_params()
        if jax.process_index() != 0:  # samples and exact match are logged by process 0 alone
            return [""] * len(prompts)
        if jax.process_count() > 1:  # generate on process 0's first device, outside the global mesh
            params = jax.device_put(params, jax.local_devices()[0])
        eos = self.tokenizer.eos_token_id
        max_new = min(self.config.train.max_new_tokens, self.model_cfg.n_positions - max(map(len, prompts)))
        texts = []
        for lo in range(0, len(prompts), GENERATE_BATCH):
            chunk = prompts[lo:lo + GENERATE_BATCH]
            padded = chunk + [chunk[-1]] * (GENERATE_BATCH - len(chunk)) if len(prompts) > GENERATE_BATCH else chunk
            outs = generate(params, self.model_cfg, padded, max_new_tokens=max_new, eos_id=eos)
            for ids in outs[:len(chunk)]:
                ids = ids[:-1] if ids and ids[-1] == eos else ids
                texts.append(decode(self.tokenizer, ids))
        return texts

    def host_params(self):
        """Parameters every process can read whole: the sharded ones with one process; with
        several, gathered from all of them (a collective: every process must call this)."""
        if jax.process_count() == 1:
            return self.state.params
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(self.state.params, tiled=True)

    # --- the end --------------------------------------------------------------------------
    def final_outputs(self, out: Path, data_report, t_start: float) -> dict:
        results = self.evaluate(self.total_steps)
        main = jax.process_index() == 0
        export_dir = out / "hf"
        params = self.host_params() if self.config.run.export else None
        if self.config.run.export and main:
            from sft_jax.hf import export_hf

            export_hf(params, self.model_cfg.replace(dtype="float32", remat="none"), export_dir,
                      tokenizer=self.tokenizer, chat_template=chat_template(self.config.data), verify=True,
                      overwrite=True)
        if main:
            summary = {"final_loss": self.last_loss, "steps": self.total_steps,
                       "wall_time_s": time.perf_counter() - t_start, **results}
            report = write_report(out, data_report_md=report_to_markdown(data_report), summary=summary)
            lines = [f"checkpoints: {self.manager.directory}", f"report:      {report}"]
            if self.config.run.export:
                lines += [f"HF export:   {export_dir}",
                          f"chat with it: python -m sft_jax.generate --model {export_dir}"]
            print("\n".join(lines), flush=True)
        return results


def _finite_or_none(x) -> Optional[float]:
    return float(x) if np.isfinite(x) else None  # JSON has no NaN


def _last_response(example) -> str:
    messages = example if isinstance(example, list) else example.get("messages", [])
    replies = [m["content"] for m in messages if m.get("role") == "assistant"]
    return replies[-1] if replies else ""
