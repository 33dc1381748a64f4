"""Benchmark of one SFT train step: this JAX stack next to HF transformers' PyTorch GPT-2.

    python -m sft_jax.bench --preset gpt2-large --batch 8 --seq 1024 --steps 20 --remat save_dots

Both sides run the same computation on the same weights and batch: fp32 master weights,
``--dtype`` compute (bf16 autocast for torch on CUDA), loss on response tokens only (the
first 30% of each row is prompt: label -100 for torch, weight 0 for JAX), global-norm
clipping at 1.0, the trainer's AdamW (``sft_jax.optim``; decay 0.1 on matmul weights) on
its linear-warmup cosine schedule. The JAX side times the trainer's own step
(``sft_jax.train_step.make_train_step``: scanned layers, the chunked float32 ``token_nll``,
the non-finite guard, a donated state) on a one-device mesh, so the number is what
``python -m sft_jax.train`` runs; torch is eager ``GPT2LMHeadModel`` with SDPA attention
and fused AdamW on CUDA. The torch model is built from the JAX initial parameters, so the
first-step losses must agree; they are reported next to the speed as a check that the two
sides do the same work.

Warmup steps (compilation, allocator growth) are excluded; the timed steps end with a
device sync. tokens/s counts every position of the batch, prompt included. MFU uses
``GPT2Config.flops_per_token`` (see ``sft_jax.metrics``) and is null on CPU.
"""

from __future__ import annotations

import os

# torch shares the accelerator in the same process: without this JAX would reserve 75%
# of its memory up front. Set before JAX creates its backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sft_jax import cli, metrics
from sft_jax import sharding as shd
from sft_jax import train_step as ts
from sft_jax.config import OptimSection
from sft_jax.hf import to_hf_state_dict
from sft_jax.model import GPT2Config, init_params
from sft_jax.optim import make_optimizer

PROMPT_FRACTION = 0.3  # leading share of each row that is prompt (no loss)
# The trainer's optimizer (sft_jax.optim) with decay switched on, so its mask costs too;
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
            peak_bytes: Optional[int], device_kind: str, **extra) -> dict:
    tokens_per_s = batch * seq / step_time
    return {
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
    _, shardings = ts.state_shardings(cfg, tx, mesh)
    step = ts.make_train_step(cfg, tx, schedule, mesh=mesh, shardings=shardings, loss_chunk=loss_chunk,
                              clip_norm=OPTIM.clip_norm)
    return mesh, shardings, step


def run_jax(cfg: GPT2Config, params: dict, hf_batch: dict, *, steps: int, warmup: int, loss_chunk: int = LOSS_CHUNK) -> dict:
    B, T = hf_batch["input_ids"].shape
    chunk = loss_chunk if 0 < loss_chunk < T and T % loss_chunk == 0 else 0
    tx, schedule = make_optimizer(dataclasses.replace(OPTIM, warmup_steps=warmup), warmup + steps)
    mesh, shardings, train_step = make_jax_step(cfg, tx, schedule, chunk)
    batch = shd.global_batch(jax_batch(hf_batch), mesh, B)
    state = [ts.init_state(cfg, tx, mesh, shardings, params={"params": params})]

    def one_step():
        state[0], out = train_step(state[0], batch)
        return lambda: float(jax.block_until_ready(out)["loss"])

    first_loss, step_time = _timed(one_step, warmup, steps)
    device = mesh.devices.flat[0]
    memory = metrics.device_memory(device)
    return _result("jax", cfg, B, T, first_loss, step_time, memory and memory["peak_bytes_in_use"],
                   device.device_kind, compute_dtype=cfg.dtype, remat=cfg.remat, attention=cfg.attention,
                   loss_chunk=chunk)


# --- PyTorch / HF transformers -------------------------------------------------

def torch_model(cfg: GPT2Config, params: dict, device: str):
    """HF ``GPT2LMHeadModel`` (SDPA attention) holding the same weights as ``params``."""
    import torch
    import transformers

    hf_config = transformers.GPT2Config(**{**cfg.to_hf_config(), "use_cache": False}, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(hf_config)
    model.loss_type = "ForCausalLM"  # HF's name-based lookup misses this class and warns; same loss either way
    state = {k: torch.from_numpy(v) for k, v in to_hf_state_dict(params, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to wte
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device)


def run_torch(cfg: GPT2Config, params: dict, hf_batch: dict, *, steps: int, warmup: int) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = torch_model(cfg, params, device).train()
    torch_remat = cfg.remat == "full"  # HF has no save-the-matmuls policy: save_dots runs without recompute
    if torch_remat:
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable()
    optim = dataclasses.replace(OPTIM, warmup_steps=warmup)

    def decays(name, p):  # sft_jax.optim's decay mask in HF names: matmul weights, not embeddings/biases/LN
        return p.ndim == 2 and not name.endswith(("wte.weight", "wpe.weight"))

    named = list(model.named_parameters())  # the tied lm_head is listed once, as wte
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": optim.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps, fused=cuda)
    _, schedule = make_optimizer(optim, warmup + steps)
    lrs = np.asarray(jax.vmap(schedule)(jnp.arange(warmup + steps + 1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lrs[min(s, len(lrs) - 1)]) / optim.lr)
    ids = torch.from_numpy(hf_batch["input_ids"]).to(device)
    labels = torch.from_numpy(hf_batch["labels"]).to(device)
    autocast = cuda and cfg.dtype != "float32"
    amp = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if autocast else contextlib.nullcontext()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def one_step():
        with amp:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        return lambda: (torch.cuda.synchronize() if cuda else None, float(loss))[1]

    first_loss, step_time = _timed(one_step, warmup, steps)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    B, T = hf_batch["input_ids"].shape
    result = _result("torch", cfg, B, T, first_loss, step_time, peak, kind,
                     compute_dtype=cfg.dtype if autocast else "float32", remat="full" if torch_remat else "none")
    del model, opt
    if cuda:
        torch.cuda.empty_cache()  # hand the memory back before JAX runs
    return result


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
        results["torch"] = run_torch(cfg, host_params, hf_batch, steps=steps, warmup=warmup)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2", help="model preset (sft_jax.model.PRESETS)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    ap.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"],
                    help="JAX attention kernel (cudnn: fused, GPU + bf16 only, else falls back to xla)")
    ap.add_argument("--no-torch", action="store_true", help="skip the HF PyTorch run")
    ap.add_argument("--json", help="write the results here")
    args = cli.parse(ap, argv)
    from sft_jax.model import PRESETS

    if args.preset not in PRESETS:
        return cli.user_error(f"--preset {args.preset!r}: choose one of {sorted(PRESETS)}")
    if min(args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        return cli.user_error("--batch, --seq and --steps must be at least 1, --warmup at least 0")
    try:
        results = benchmark(args.preset, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                            dtype=args.dtype, remat=args.remat, attention=args.attention,
                            with_torch=not args.no_torch)
    except ValueError as e:  # --seq beyond the preset's context
        return cli.user_error(e)
    print(markdown_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
