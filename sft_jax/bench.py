"""Benchmark of one SFT train step: this JAX stack next to HF transformers' PyTorch GPT-2.

    python -m sft_jax.bench --preset gpt2-large --batch 8 --seq 1024 --steps 20 --remat save_dots

Both sides run the same computation on the same weights and batch: fp32 master weights,
``--dtype`` compute (bf16 autocast for torch on CUDA), loss on response tokens only (the
first 30% of each row is prompt: label -100 for torch, weight 0 for JAX), global-norm
clipping at 1.0, the trainer's AdamW (``sft_jax.core.optimizer``; decay 0.1 on matmul weights) on
its linear-warmup cosine schedule. The JAX side times the trainer's own step
(``sft_jax.objectives.sft.make_train_step``: scanned layers, the chunked float32 ``token_nll``,
the non-finite guard, a donated state) on a one-device mesh, so the number is what
``python -m sft_jax.train`` runs; torch is eager ``GPT2LMHeadModel`` with SDPA attention
and fused AdamW on CUDA. The torch model is built from the JAX initial parameters, so the
first-step losses must agree; they are reported next to the speed as a check that the two
sides do the same work.

Warmup steps (compilation, allocator growth) are excluded; the timed steps end with a
device sync. tokens/s counts every position of the batch, prompt included. MFU uses
``GPT2Config.flops_per_token`` (see ``sft_jax.core.metrics``) and is null on CPU.
"""

from __future__ import annotations

import os

# torch shares the accelerator in the same process: without this JAX would reserve 75%
# of its memory up front. Set before JAX creates its backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import json
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sft_jax import cli
from sft_jax.core import metrics
from sft_jax.core import mesh as shd
from sft_jax.objectives import sft
from sft_jax.config import OptimSection
from sft_jax.model import GPT2Config, init_params
from sft_jax.core.optimizer import make_optimizer

PROMPT_FRACTION = 0.3  # leading share of each row that is prompt (no loss)
# The trainer's optimizer (sft_jax.core.optimizer) with decay switched on, so its mask costs too;
# warmup_steps is set per run to the untimed steps.
OPTIM = OptimSection(lr=1e-4, weight_decay=0.1, clip_norm=1.0)
LOSS_CHUNK = 256  # sequence positions per chunk of the fp32 vocab projection in token_nll


# --- the shared problem -----------------------------------------------------

def make_batch(cfg: GPT2Config, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-style SFT batch: ``input_ids`` (B,T) random tokens, ``labels`` (B,T) equal to the
    ids with -100 on the prompt part."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq), dtype=np.int64)
    labels = ids.copy()
    labels[:, : int(PROMPT_FRACTION * seq)] = -100
    return {"input_ids": ids, "labels": labels}


def jax_batch(hf_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same batch in this stack's (numpy) layout. HF shifts inside the loss (position t
    predicts label t+1); here targets are shifted up front and the last position gets weight 0."""
    ids, labels = hf_batch["input_ids"], hf_batch["labels"]
    B, T = ids.shape
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    weights = np.zeros((B, T), np.float32)
    weights[:, :-1] = labels[:, 1:] != -100
    return {
        "tokens": ids.astype(np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "segment_ids": np.ones((B, T), np.int32),  # one document a row, no padding
        "targets": targets.astype(np.int32),
        "weights": weights,
    }


def make_packed_batch(cfg: GPT2Config, batch: int, seq: int, seed: int = 0) -> tuple[dict, dict]:
    """Packed rows, as training sees them: documents of log-uniform length in [30, 600]
    (``seed``), random tokens, the first 30% of each document prompt, packed by
    ``sft_jax.data.pack`` (the trainer's packer, seeded plan) into rows of ``seq``; the first
    ``batch`` rows. Returns (JAX batch, HF batch); the HF batch adds ``position_ids`` and a
    4D block-diagonal causal ``attention_mask`` (B,1,T,T) bool, so both sides compute the
    same thing (transformers' GPT-2 has no varlen attention without extra packages)."""
    from sft_jax.data.pack import SFTDataset, assemble, packing_rows

    rng = np.random.default_rng(seed)
    n_docs = max(64, 4 * batch * seq // 150)  # plenty: the plan's first rows are full rows
    lengths = np.exp(rng.uniform(np.log(30), np.log(min(600, seq)), n_docs)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(0, cfg.vocab_size, size=int(offsets[-1]), dtype=np.int64).astype(np.int32)
    supervised = np.concatenate([np.arange(n) >= int(PROMPT_FRACTION * n) for n in lengths])
    dataset = SFTDataset(tokens, supervised, offsets, (lengths - (PROMPT_FRACTION * lengths).astype(np.int64)).astype(np.int32))
    rows = packing_rows(lengths, seq, seed, shuffle=True)
    if len(rows) < batch:
        raise ValueError(f"only {len(rows)} packed rows for batch {batch}")
    jb = assemble(dataset, rows[:batch], seq)
    seg = jb["segment_ids"]
    causal = np.tril(np.ones((seq, seq), bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, :, None] > 0)
    mask |= np.eye(seq, dtype=bool)  # padding rows see themselves only: finite softmax, no loss there
    labels = np.full(jb["tokens"].shape, -100, np.int64)  # HF shifts: label t is the target of position t-1
    labels[:, 1:] = np.where(jb["weights"][:, :-1] > 0, jb["targets"][:, :-1], -100)
    hf = {"input_ids": jb["tokens"].astype(np.int64), "labels": labels,
          "position_ids": jb["positions"].astype(np.int64), "attention_mask": mask[:, None]}
    return jb, hf


def _timed(step: Callable[[], Callable[[], float]], warmup: int, steps: int) -> tuple[float, float]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step`` (which returns a
    function that waits for the device and returns the step's loss). Returns (first step's loss, seconds per step)."""
    first_loss = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        result = step()
        if first_loss is None:
            first_loss = result()
    result()
    return first_loss, (time.perf_counter() - t0) / steps


def _result(framework: str, cfg: GPT2Config, batch: int, seq: int, first_loss: float, step_time: float,
            peak_bytes: Optional[int], device_kind: str, supervised: Optional[int] = None, **extra) -> dict:
    tokens_per_s = batch * seq / step_time
    return {
        "supervised_tokens_per_s": None if supervised is None else supervised / step_time,
        "framework": framework,
        "first_loss": first_loss,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "mfu": metrics.mfu(tokens_per_s, cfg.flops_per_token(seq), 1, device_kind),
        "peak_memory_bytes": peak_bytes,
        "device_kind": device_kind,
        **extra,
    }


# --- JAX ----------------------------------------------------------------------

def make_jax_step(cfg: GPT2Config, tx: optax.GradientTransformation, schedule: optax.Schedule, loss_chunk: int):
    """(mesh, shardings, step): the trainer's jitted ``step(state, batch)`` on one device."""
    mesh = shd.make_mesh((1, 1, 1), jax.local_devices()[:1])
    _, shardings = sft.state_shardings(cfg, tx, mesh)
    step = sft.make_train_step(cfg, tx, schedule, mesh=mesh, shardings=shardings, loss_chunk=loss_chunk,
                              clip_norm=OPTIM.clip_norm)
    return mesh, shardings, step


def jax_step_fn(cfg: GPT2Config, params: dict, host_batch: dict, *, total_steps: int, warmup: int,
                loss_chunk: int = LOSS_CHUNK):
    """(one_step, mesh, loss chunk): ``one_step()`` runs the trainer's step once on the
    device-resident batch and returns a function that waits for it and returns its loss.
    ``params`` are donated."""
    B, T = host_batch["tokens"].shape
    chunk = loss_chunk if 0 < loss_chunk < T and T % loss_chunk == 0 else 0
    tx, schedule = make_optimizer(dataclasses.replace(OPTIM, warmup_steps=warmup), total_steps)
    mesh, shardings, train_step = make_jax_step(cfg, tx, schedule, chunk)
    batch = shd.global_batch(host_batch, mesh, B)
    state = [sft.init_state(cfg, tx, mesh, shardings, params={"params": params})]

    def one_step():
        state[0], out = train_step(state[0], batch)
        return lambda: float(jax.block_until_ready(out)["loss"])

    return one_step, mesh, chunk


def run_jax(cfg: GPT2Config, params: dict, hf_batch: dict, *, steps: int, warmup: int, loss_chunk: int = LOSS_CHUNK,
            jax_rows: Optional[dict] = None) -> dict:
    """The trainer's step on ``hf_batch`` (or on ``jax_rows``, the same rows in this stack's
    layout, e.g. from ``make_packed_batch``)."""
    B, T = hf_batch["input_ids"].shape
    host_batch = jax_rows if jax_rows is not None else jax_batch(hf_batch)
    one_step, mesh, chunk = jax_step_fn(cfg, params, host_batch, total_steps=warmup + steps, warmup=warmup,
                                        loss_chunk=loss_chunk)
    first_loss, step_time = _timed(one_step, warmup, steps)
    device = mesh.devices.flat[0]
    memory = metrics.device_memory(device)
    return _result("jax", cfg, B, T, first_loss, step_time, memory and memory["peak_bytes_in_use"],
                   device.device_kind, supervised=int(host_batch["weights"].sum()), compute_dtype=cfg.dtype,
                   remat=cfg.remat, attention=cfg.attention, loss_chunk=chunk)


# --- the PyTorch reference ------------------------------------------------------

def torch_reference():
    """``benchmarks/torch_reference.py`` of the repository checkout this package runs from: HF
    transformers doing the same step. It is a benchmark harness, not part of the library, so
    it lives beside the other benchmarks and is loaded by path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the PyTorch reference comes with the repository checkout "
                                f"(benchmarks/); run python -m sft_jax.bench from one, or pass --no-torch")
    spec = importlib.util.spec_from_file_location("sft_jax_torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- driver -------------------------------------------------------------------

def benchmark(preset: str, *, batch: int, seq: int, steps: int, warmup: int = 2, dtype: str = "auto",
              remat: str = "none", attention: str = "xla", with_torch: bool = True, seed: int = 0) -> dict:
    """Both benchmarks on the same initial weights and batch; returns a JSON-able dict.
    ``dtype="auto"`` is bfloat16 on an accelerator and float32 on CPU (where torch runs
    without autocast, so both sides compute in the same precision)."""
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    cfg = GPT2Config.preset(preset, remat=remat, dtype=dtype, attention=attention)
    if steps < 1:
        raise ValueError("--steps must be at least 1")
    if seq > cfg.n_positions:
        raise ValueError(f"--seq {seq} exceeds n_positions={cfg.n_positions}")
    params = init_params(cfg, jax.random.key(seed))["params"]
    hf_batch = make_batch(cfg, batch, seq, seed)
    results = {
        "preset": preset, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "dtype": dtype, "remat": remat,
        "attention": attention,
        "n_params": cfg.num_params(), "flops_per_token": cfg.flops_per_token(seq), "torch": None, "jax_over_torch": None,
    }
    # torch first, from a host copy of the weights: it frees its memory afterwards, while
    # JAX's allocator keeps what it grew to. The JAX run then donates `params`.
    if with_torch:
        host_params = jax.device_get(params)
        results["torch"] = torch_reference().run_torch(cfg, host_params, hf_batch, steps=steps, warmup=warmup)
        del host_params
    results["jax"] = run_jax(cfg, params, hf_batch, steps=steps, warmup=warmup)
    if results["torch"]:
        results["jax_over_torch"] = results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
    return results


def markdown_table(results: dict) -> str:
    head = ("| framework | device | preset | B×T | dtype | remat | step (ms) | tokens/s | MFU | peak mem (GiB) | first loss |\n"
            "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [head]
    for r in (results["jax"], results["torch"]):
        if r is None:
            continue
        mfu = "—" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "—" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        rows.append(f"| {r['framework']} | {r['device_kind']} | {results['preset']} | {results['batch']}×{results['seq']} "
                    f"| {r['compute_dtype']} | {r['remat']} | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} "
                    f"| {mfu} | {mem} | {r['first_loss']:.5f} |")
    if results["jax_over_torch"] is not None:
        rows.append(f"\nJAX / torch tokens/s: **{results['jax_over_torch']:.2f}×**")
    return "\n".join(rows)


# --- sweep: several presets, batches, row layouts and systems in one run ---------

ROW_KINDS = ("dense", "packed")
TORCH_SYSTEMS = ("torch", "torch.compile")


def versions() -> dict:
    """Library versions and device, for the JSON record."""
    import platform

    out = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind}
    for name in ("jaxlib", "torch", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _problem(cfg: GPT2Config, rows: str, batch: int, seq: int, seed: int) -> tuple[dict, Optional[dict]]:
    if rows == "dense":
        return make_batch(cfg, batch, seq, seed), None
    jb, hf = make_packed_batch(cfg, batch, seq, seed)
    return hf, jb


def sweep(presets, batches, rows, attentions, *, seq: int, steps: int, warmup: int = 2, dtype: str = "auto",
          remat: str = "none", torch_systems=("torch",), seed: int = 0, log=print, on_record=None) -> list[dict]:
    """One record per (preset, rows, batch, system): JAX once per attention path, torch eager
    and/or torch.compile, all on the same initial weights and the same rows. A configuration
    that fails (out of memory at a large batch, a kernel this device lacks) is recorded with
    its error instead of numbers, and the sweep goes on. The JAX peak memory is the process's
    peak so far (XLA has no reset), so it is exact for the first JAX record of a process only."""
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    records = []
    for preset in presets:
        cfg = GPT2Config.preset(preset, remat=remat, dtype=dtype)
        if seq > cfg.n_positions:
            raise ValueError(f"--seq {seq} exceeds n_positions={cfg.n_positions}")
        host_params = jax.device_get(init_params(cfg, jax.random.key(seed))["params"])
        for row_kind in rows:
            for batch in batches:
                hf_batch, jax_rows = _problem(cfg, row_kind, batch, seq, seed)
                key = {"preset": preset, "rows": row_kind, "batch": batch, "seq": seq, "steps": steps,
                       "warmup": warmup, "dtype": dtype, "remat": remat}
                runs = [(name, lambda name=name: torch_reference().run_torch(cfg, host_params, hf_batch, steps=steps, warmup=warmup,
                                                           compile=name == "torch.compile"))
                        for name in torch_systems]
                runs += [(f"jax/{attn}", lambda attn=attn: run_jax(
                    cfg.replace(attention=attn), jax.tree.map(jnp.asarray, host_params), hf_batch,
                    steps=steps, warmup=warmup, jax_rows=jax_rows)) for attn in attentions]
                for system, run in runs:
                    try:
                        rec = {**key, "system": system, **run()}
                    except Exception as e:  # recorded and printed, not hidden: the cell says why it is empty
                        rec = {**key, "system": system, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    records.append(rec)
                    log(_record_line(rec))
                    if on_record is not None:
                        on_record(records)
    return records


def _record_line(r: dict) -> str:
    if "error" in r:
        return f"{r['preset']} {r['rows']} B={r['batch']} {r['system']}: not measured ({r['error']})"
    return (f"{r['preset']} {r['rows']} B={r['batch']} {r['system']}: {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r['supervised_tokens_per_s']:,.0f} supervised/s, first loss {r['first_loss']:.5f}")


def sweep_table(records: list[dict]) -> str:
    """Markdown: each system at its own best batch, per preset and row layout; ratios to torch
    eager and torch.compile on dense rows. Cells without a measurement say so."""
    best: dict = {}
    for r in records:
        k = (r["preset"], r["rows"], r["system"])
        if "error" not in r and (k not in best or r["tokens_per_s"] > best[k]["tokens_per_s"]):
            best[k] = r
        best.setdefault(k, r)
    lines = ["| preset | rows | system | best B | tokens/s | supervised tokens/s | MFU | peak mem (GiB) | first loss "
             "| × torch | × torch.compile |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    nm = "not measured"
    for (preset, rows, system), r in best.items():
        if "error" in r:
            lines.append(f"| {preset} | {rows} | {system} | {nm} | {nm} | {nm} | {nm} | {nm} | {nm} | {nm} | {nm} |")
            continue
        mfu = nm if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = nm if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        ratios = []
        for ref in TORCH_SYSTEMS:
            other = best.get((preset, "dense", ref))
            ok = rows == "dense" and other is not None and "error" not in other
            ratios.append(f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}×" if ok else "—")
        lines.append(f"| {preset} | {rows} | {system} | {r['batch']} | {r['tokens_per_s']:,.0f} "
                     f"| {r['supervised_tokens_per_s']:,.0f} | {mfu} | {mem} | {r['first_loss']:.4f} | {ratios[0]} | {ratios[1]} |")
    lines.append("\nMFU counts T = 1024 attention FLOPs on packed rows too (the block-diagonal mask skips some); "
                 "ratios to torch use dense rows only.")
    return "\n".join(lines)


def _csv(kind, choices=None):
    def parse(text: str):
        items = [kind(x) for x in text.split(",") if x]
        bad = [x for x in items if choices is not None and x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list" + (f" of {list(choices)}" if choices else ""))
        return items
    return parse


def main(argv=None):
    from sft_jax.model import ATTENTION_IMPLS, PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=["gpt2"], type=_csv(str),
                    help="model preset(s), comma-separated (sft_jax.model.PRESETS); 'all' = the four GPT-2 sizes")
    ap.add_argument("--batch", type=_csv(int), default=[8], help="batch size(s), e.g. 8,16,32: each system "
                    "is reported at its own best batch")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    ap.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    ap.add_argument("--attention", default=["auto"], type=_csv(str, ATTENTION_IMPLS),
                    help="JAX attention path(s), comma-separated (sft_jax.model.resolve_attention)")
    ap.add_argument("--rows", default=["dense"], type=_csv(str, ROW_KINDS),
                    help="dense (one causal document a row) and/or packed (log-uniform [30, 600] documents "
                         "packed by sft_jax.data.pack)")
    ap.add_argument("--torch-compile", action="store_true", help="add torch.compile of the same HF step as a column")
    ap.add_argument("--no-torch", action="store_true", help="skip the HF PyTorch runs")
    ap.add_argument("--json", help="write {versions, records: one per configuration} here")
    args = cli.parse(ap, argv)
    presets = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] if "all" in args.preset else args.preset
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        return cli.user_error(f"--preset {','.join(unknown)}: choose one of {sorted(PRESETS)} or all")
    if min(*args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        return cli.user_error("--batch, --seq and --steps must be at least 1, --warmup at least 0")
    torch_systems = () if args.no_torch else (TORCH_SYSTEMS if args.torch_compile else ("torch",))

    def write_json(records):  # after every record, so a run stopped early keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"versions": versions(), "records": records}, f, indent=2)

    try:
        records = sweep(presets, args.batch, args.rows, args.attention, seq=args.seq, steps=args.steps,
                        warmup=args.warmup, dtype=args.dtype, remat=args.remat, torch_systems=torch_systems,
                        log=lambda line: print(line, flush=True), on_record=write_json)
    except ValueError as e:  # --seq beyond the preset's context
        return cli.user_error(e)
    print(sweep_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
