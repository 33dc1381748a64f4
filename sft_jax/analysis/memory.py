"""Claim 6: memory ≈ parameters + gradients + optimizer states (+ activations and logits).

Bytes per device, predicted analytically: the train state's bytes are counted exactly from
its abstract shapes and shardings (no allocation); gradients, activations under a remat
policy and the logits buffer by a model stated below. Beside XLA's accounting of the
compiled step (``compiled.memory_analysis()``), which needs no memory either: the step is
lowered on abstract shapes (``jax.ShapeDtypeStruct``) and compiled."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.adapters import lora
from sft_jax.adapters.objective import LoraObjective
from sft_jax.core import mesh as shd
from sft_jax.core import step as core
from sft_jax.objectives import sft
from sft_jax.config import OptimSection
from sft_jax.core.optimizer import make_optimizer
from sft_jax.models.family import ModelConfig, config_for_preset, family_of

GB, GIB = 1e9, 2 ** 30
BATCH_ARRAYS = len(sft.BATCH_KEYS)  # tokens, targets, weights, positions, segment_ids: 4 bytes each
# Activations kept per token and layer for the backward pass: the family's count
# (``activations_per_token(remat)``, elements at the compute dtype), plus the attention scores
# and probabilities (2 H T) where the policy keeps them.
SCORES_KEPT = {"none": True, "save_dots": False, "full": False}
CLAIM_N = 1.5e9  # the claim's round parameter count
# The step is compiled to be measured, never run: without LLVM's optimisations the CPU compile
# takes about half as long, and XLA's buffer assignment (what memory_analysis reports) is the
# same: argument, output, alias and temp bytes compared equal for gpt2 and gpt2-xl (B = 2, T = 256,
# fsdp 2 x tensor 4 CPU devices) with and without it.
ACCOUNTING_ONLY = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Layout:
    """One candidate way to run a step: mesh sizes, remat, rows per micro-batch, loss chunk."""
    data: int
    fsdp: int
    tensor: int
    remat: str
    global_batch: int  # rows per optimizer step
    micro_batch: int  # rows per accumulation micro-step
    seq: int
    loss_chunk: int = 0

    @property
    def dp(self) -> int:
        return self.data * self.fsdp


def abstract_state(model_cfg: ModelConfig, mesh, spec: lora.LoraSpec | None = None):
    """(abstract train state with shardings, optimizer): of the whole model, or of the adapters
    of ``spec`` (LoRA)."""
    tx, _ = make_optimizer(OptimSection(), total_steps=1000)
    if spec is None:
        return sft.state_shardings(model_cfg, tx, mesh)[0], tx
    return core.state_shardings(lora.abstract_adapters(model_cfg, spec), tx, mesh)[0], tx


def abstract_base(model_cfg: ModelConfig, mesh):
    """(abstract frozen base with shardings, its shardings): the model's parameters in the
    compute dtype, sharded as in full fine-tuning, as LoRA holds them."""
    boxed = family_of(model_cfg).param_shapes(model_cfg)
    shardings = shd.logical_shardings(mesh, boxed)
    dtype = jnp.dtype(model_cfg.dtype)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh), nn.unbox(boxed),
                        shardings), shardings


def lora_objective(model_cfg: ModelConfig, spec: lora.LoraSpec, loss_chunk: int = 0) -> LoraObjective:
    """LoRA around the SFT loss with no run behind it: what the step traces, nothing that reads
    a config, data or tokenizer."""
    inner = sft.SFTLoss(model_cfg, loss_chunk)
    inner.config = inner.tokenizer = inner.hf_dir = None
    inner.model_cfg = model_cfg
    return LoraObjective(inner, spec)


def _device_bytes(leaf) -> int:
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def state_bytes(model_cfg: ModelConfig, mesh, spec: lora.LoraSpec | None = None) -> dict:
    """Bytes per device of the train state, counted from its abstract shards: the trained
    parameters (float32 masters of the model, or of the adapters under ``spec``), Adam m and v,
    and the scalars (optimizer counts, non-finite counters). Under LoRA also the frozen base
    (compute dtype) and ``lowrank``, the elements per token of the adapters' thin activations
    (x Aᵀ, r per target and layer) that the backward pass keeps."""
    state, _ = abstract_state(model_cfg, mesh, spec)
    params = sum(_device_bytes(x) for x in jax.tree.leaves(state.params))
    opt = jax.tree.leaves(state.opt_state)
    adam = sum(_device_bytes(x) for x in opt if x.ndim > 0)
    scalars = sum(_device_bytes(x) for x in opt if x.ndim == 0)
    scalars += sum(_device_bytes(x) for x in (state.nonfinite_total, state.nonfinite_run, state.nonfinite_tripped))
    frozen = lowrank = 0
    if spec is not None:
        base, _ = abstract_base(model_cfg, mesh)
        frozen = sum(_device_bytes(x) for x in jax.tree.leaves(base))
        lowrank = model_cfg.num_hidden_layers * spec.rank * len(spec.targets)
    return {"params": params, "adam": adam, "scalars": scalars, "frozen": frozen, "lowrank": lowrank}


def batch_bytes(layout: Layout) -> int:
    return BATCH_ARRAYS * 4 * (layout.global_batch // layout.dp) * layout.seq


def activation_bytes(model_cfg: ModelConfig, layout: Layout) -> int:
    """Activations kept for the backward pass of one micro-batch, per device."""
    width = np.dtype(model_cfg.dtype).itemsize
    rows = layout.micro_batch // layout.dp
    tokens = rows * layout.seq
    H, L = model_cfg.num_attention_heads, model_cfg.num_hidden_layers
    per_layer = model_cfg.activations_per_token(layout.remat)
    if SCORES_KEPT[layout.remat]:
        per_layer += 2 * H * layout.seq / layout.tensor
    kept = L * tokens * per_layer * width
    if layout.remat != "none":  # one layer's activations rebuilt at a time in the backward pass
        kept += tokens * (model_cfg.activations_per_token("none") + 2 * H * layout.seq / layout.tensor) * width
    return int(kept)


def logits_bytes(model_cfg: ModelConfig, layout: Layout) -> int:
    """float32 logits and their gradient for the positions computed at once."""
    rows = layout.micro_batch // layout.dp
    positions = layout.loss_chunk or layout.seq
    return int(2 * rows * positions * model_cfg.padded_vocab_size * 4 / layout.tensor)


def predict(model_cfg: ModelConfig, layout: Layout, state: dict) -> dict:
    """Predicted bytes per device; ``state`` from ``state_bytes`` on the layout's mesh."""
    cfg = model_cfg.replace(remat=layout.remat)
    out = dict(state)
    out["grads"] = 2 * state["params"]  # the accumulated sum and one micro-step's gradient, float32
    out["activations"] = activation_bytes(cfg, layout)
    out["logits"] = logits_bytes(cfg, layout)
    out["batch"] = batch_bytes(layout)
    frozen, lowrank = state.get("frozen", 0), state.get("lowrank", 0)
    out["arguments"] = frozen + state["params"] + state["adam"] + state["scalars"] + out["batch"]
    # LoRA: the adapters' thin activations x Aᵀ, kept for the backward pass (no merged kernel
    # or (in, out) gradient is formed: models.layers.common.project)
    tokens = layout.micro_batch // layout.dp * layout.seq
    out["temp"] = (out["grads"] + out["activations"] + out["logits"]
                   + tokens * lowrank * np.dtype(cfg.dtype).itemsize)
    out["total"] = out["arguments"] + out["temp"]
    return out


def make_mesh(layout: Layout, devices):
    return shd.make_mesh((layout.data, layout.fsdp, layout.tensor), devices[:layout.data * layout.fsdp * layout.tensor])


def compiled_memory(model_cfg: ModelConfig, layout: Layout, mesh, spec: lora.LoraSpec | None = None) -> dict:
    """XLA's memory accounting of the jitted train step (of the adapters on a frozen base under
    ``spec``), compiled on abstract shapes."""
    cfg = model_cfg.replace(remat=layout.remat)
    state, tx = abstract_state(cfg, mesh, spec)
    _, schedule = make_optimizer(OptimSection(), total_steps=1000)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    n_micro = layout.global_batch // layout.micro_batch
    if spec is None:
        step = sft.make_train_step(cfg, tx, schedule, mesh=mesh, shardings=shardings, n_micro=n_micro,
                                   loss_chunk=layout.loss_chunk)
        frozen = None
    else:
        base, base_sh = abstract_base(cfg, mesh)
        step = core.make_train_step(lora_objective(cfg, spec, layout.loss_chunk), tx, schedule, mesh=mesh,
                                    shardings=shardings, n_micro=n_micro, frozen_shardings=(base_sh, None))
        frozen = (base, None)
    batch_sh = shd.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((layout.global_batch, layout.seq),
                                     np.float32 if k == "weights" else np.int32, sharding=batch_sh)
             for k in sft.BATCH_KEYS}
    with shd.rules_context(mesh):
        # the core's step.jitted is a plain function around its jax.jit: jit it again to lower it
        jitted = step.jitted if hasattr(step.jitted, "lower") else jax.jit(step.jitted)
        compiled = jitted.lower(state, batch, frozen).compile(compiler_options=ACCOUNTING_ONLY)
    m = compiled.memory_analysis()
    return {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                           "alias_size_in_bytes", "generated_code_size_in_bytes")}


def claim_table(ns=(CLAIM_N, None)) -> list[dict]:
    """The arithmetic of claim 6 for N parameters: fp32 weights 4N, a bf16 copy 2N, fp32
    gradients 4N, Adam m and v 8N; total 16N (the bf16 copy is transient, not added)."""
    rows = []
    for n in ns:
        n = n if n is not None else config_for_preset("gpt2-xl").num_params()
        rows.append({"N": n, "weights_fp32": 4 * n, "weights_bf16": 2 * n, "grads_fp32": 4 * n,
                     "adam": 8 * n, "total": 16 * n})
    return rows


def claim_table_markdown(rows: list[dict]) -> str:
    head = "| | " + " | ".join(f"N = {r['N']:,.0f}" for r in rows) + " |"
    lines = [head, "|---|" + "---:|" * len(rows)]
    for key, label in (("weights_fp32", "fp32 weights (4N)"), ("weights_bf16", "bf16 copy (2N)"),
                       ("grads_fp32", "fp32 gradients (4N)"), ("adam", "Adam m + v (8N)"),
                       ("total", "weights + gradients + Adam (16N)")):
        lines.append(f"| {label} | " + " | ".join(f"{r[key] / GB:.2f} GB ({r[key] / GIB:.2f} GiB)" for r in rows) + " |")
    return "\n".join(lines)


# --- the planner ------------------------------------------------------------------------------

REMAT_COST = {"none": 1.0, "save_dots": 1.15, "full": 1.33}  # step time relative to no remat (recompute)
MICRO_STEP_COST = 0.02  # extra time per accumulation micro-step beyond the first
TENSOR_COST = 0.05  # extra time per doubling of the tensor axis (activation all-reduces)
CHUNK_COST = 0.02  # extra time of a chunked (recomputed) loss
HEADROOM = 0.9  # a layout fits if its predicted bytes are at most this share of the device memory


def parse_bytes(text: str) -> int:
    """'16GB' (1e9), '16GiB' (2**30), '800MB', '800MiB' -> bytes."""
    units = {"gib": 2 ** 30, "gb": 1e9, "mib": 2 ** 20, "mb": 1e6, "tib": 2 ** 40, "tb": 1e12}
    t = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * units[unit])
            except ValueError:
                break
    raise ValueError(f"--memory {text!r}: give a size such as 16GB or 80GiB")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(model_cfg: ModelConfig, devices: int, global_batch: int, seq: int) -> list[Layout]:
    out = []
    for tensor in _divisors(devices):
        if model_cfg.num_attention_heads % tensor:
            continue
        dp = devices // tensor
        for data, fsdp in {(1, dp), (dp, 1)}:
            for micro in _divisors(global_batch):
                if micro % dp:
                    continue
                for remat in ("none", "save_dots", "full"):
                    for chunk in [0] + [c for c in (256,) if seq % c == 0 and c < seq]:
                        out.append(Layout(data, fsdp, tensor, remat, global_batch, micro, seq, chunk))
    return out


def cost(layout: Layout) -> float:
    """Relative step time by the analytic model (lower is better); ranks the layouts that fit."""
    return (REMAT_COST[layout.remat] * (1 + MICRO_STEP_COST * (layout.global_batch // layout.micro_batch - 1))
            * (1 + TENSOR_COST * np.log2(layout.tensor)) * (1 + (CHUNK_COST if layout.loss_chunk else 0.0)))


def plan(model_cfg: ModelConfig, devices, global_batch: int, seq: int, memory_bytes: int,
         spec: lora.LoraSpec | None = None) -> list[tuple[Layout, dict]]:
    """Layouts whose predicted bytes per device fit ``HEADROOM x memory_bytes``, best first;
    for LoRA adapters on a frozen base under ``spec``."""
    states: dict = {}
    fits = []
    for layout in candidate_layouts(model_cfg, len(devices), global_batch, seq):
        key = (layout.data, layout.fsdp, layout.tensor)
        if key not in states:
            states[key] = state_bytes(model_cfg, make_mesh(layout, devices), spec)
        p = predict(model_cfg, layout, states[key])
        if p["total"] <= HEADROOM * memory_bytes:
            fits.append((layout, p))
    fits.sort(key=lambda lp: (cost(lp[0]), lp[1]["total"]))
    return fits
