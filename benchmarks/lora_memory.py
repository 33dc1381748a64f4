"""Full fine-tuning against LoRA: XLA's memory accounting of the compiled train steps (on
abstract shapes, nothing allocated), the checkpoint each keeps, and a short CPU step time.

    python benchmarks/lora_memory.py [--preset gpt2-large] [--rank 16] [--targets c_attn]
                                     [--batch 4] [--seq 512] [--time-preset gpt2] [--time-steps 3]

The base under LoRA is frozen in bf16 (model.dtype); full fine-tuning keeps float32 masters,
gradients and Adam m and v. Step times run a smaller preset (``--time-preset``) for real on the
CPU: a full gpt2-large state does not fit a small machine's memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.adapters import lora
from sft_jax.analysis.memory import ACCOUNTING_ONLY, abstract_base, lora_objective
from sft_jax.config import OptimSection
from sft_jax.core import mesh as shd
from sft_jax.core import step as core
from sft_jax.core.optimizer import make_optimizer
from sft_jax.models.family import config_for_preset, family_of
from sft_jax.objectives import sft


def steps(cfg, spec, mesh):
    """(full step, its abstract state), (LoRA step, its abstract state, abstract frozen base)."""
    tx, schedule = make_optimizer(OptimSection(), 1000)
    full_abs, full_sh = sft.state_shardings(cfg, tx, mesh)
    full = core.make_train_step(sft.SFTLoss(cfg), tx, schedule, mesh=mesh, shardings=full_sh)
    objective = lora_objective(cfg, spec)
    lora_abs, lora_sh = core.state_shardings(objective.abstract_params(), tx, mesh)
    base_abs, base_sh = abstract_base(cfg, mesh)
    lstep = core.make_train_step(objective, tx, schedule, mesh=mesh, shardings=lora_sh,
                                 frozen_shardings=(base_sh, None))
    return (full, full_abs), (lstep, lora_abs, (base_abs, None)), (tx, lora_sh, objective)


def batch_abs(mesh, batch, seq):
    sh = core.batch_shardings(mesh, sft.SFTLoss.batch_axes)
    return {k: jax.ShapeDtypeStruct((batch, seq), np.float32 if k == "weights" else np.int32, sharding=sh[k])
            for k in sft.BATCH_KEYS}


def memory(step, state, b, frozen=None) -> dict:
    with shd.rules_context(step_mesh[0]):
        compiled = jax.jit(step.jitted).lower(state, b, frozen).compile(compiler_options=ACCOUNTING_ONLY)
    m = compiled.memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}


step_mesh: list = []


def state_bytes(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def lora_checkpoint_bytes(cfg, spec, tx, shardings, objective) -> int:
    """Bytes on disk of a real orbax checkpoint of the LoRA state (adapters + Adam)."""
    from sft_jax.core import checkpoint as ckpt

    state = core.init_state(objective.init_params, tx, shardings)
    # trained values, not the zeros of B and of fresh Adam moments (which the checkpoint compresses)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    with tempfile.TemporaryDirectory() as d:
        manager = ckpt.make_manager(Path(d), keep=1, async_save=False)
        ckpt.save(manager, 1, params=state.params, opt_state=state.opt_state, model_config=cfg, force=True)
        manager.wait_until_finished()
        manager.close()
        return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def step_time(preset, spec_args, batch, seq, n) -> dict:
    cfg = config_for_preset(preset, dtype="bfloat16")
    spec = lora.resolve(cfg, *spec_args)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    (full, full_abs), (lstep, lora_abs, _), (tx, lora_sh, objective) = steps(cfg, spec, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    host = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "weights": np.ones((batch, seq), np.float32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32)}
    out = {}
    base = jax.jit(lambda k: jax.tree.map(lambda x: x.astype(jnp.bfloat16), family_of(cfg).init_params(cfg, k)))(
        jax.random.key(0))
    for name in ("full", "lora"):
        if name == "full":
            _, full_sh = sft.state_shardings(cfg, tx, mesh)
            state = sft.init_state(cfg, tx, mesh, full_sh)
            run, frozen = full, None
        else:
            state = core.init_state(objective.init_params, tx, lora_sh)
            run, frozen = lstep, (base, None)
        b = core.global_batch(host, run.batch_shardings, batch)
        state, m = run(state, b, frozen)
        jax.block_until_ready(m["loss"])
        t = time.perf_counter()
        for _ in range(n):
            state, m = run(state, b, frozen)
        jax.block_until_ready(m["loss"])
        out[name] = (time.perf_counter() - t) / n
        del state
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-large")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="c_attn")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--time-preset", default="gpt2")
    p.add_argument("--time-batch", type=int, default=2)
    p.add_argument("--time-seq", type=int, default=128)
    p.add_argument("--time-steps", type=int, default=3)
    args = p.parse_args()
    cfg = config_for_preset(args.preset, dtype="bfloat16")
    spec = lora.resolve(cfg, args.rank, args.alpha, False, args.targets)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    step_mesh.append(mesh)
    (full, full_abs), (lstep, lora_abs, frozen_abs), (tx, lora_sh, objective) = steps(cfg, spec, mesh)
    b = batch_abs(mesh, args.batch, args.seq)
    result = {"preset": args.preset, "rank": args.rank, "targets": spec.modules, "batch": args.batch,
              "seq": args.seq, "base_params": cfg.num_params(),
              "adapter_params": state_bytes(lora_abs.params) // 4}
    result["full"] = memory(full, full_abs, b)
    result["lora"] = memory(lstep, lora_abs, b, frozen_abs)
    result["full"]["checkpoint_bytes_state"] = state_bytes((full_abs.params, full_abs.opt_state))
    result["lora"]["checkpoint_bytes_state"] = state_bytes((lora_abs.params, lora_abs.opt_state))
    result["lora"]["checkpoint_bytes_on_disk"] = lora_checkpoint_bytes(cfg, spec, tx, lora_sh, objective)
    if args.time_steps:
        result["step_time_s"] = {"preset": args.time_preset, "batch": args.time_batch, "seq": args.time_seq,
                                 **step_time(args.time_preset, (args.rank, args.alpha, False, args.targets),
                                             args.time_batch, args.time_seq, args.time_steps)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
