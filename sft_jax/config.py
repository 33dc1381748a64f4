"""The run configuration: one frozen, typed tree; YAML files in ``configs/`` are values for it.

    cfg = load_config("configs/gpt2_alpaca.yaml", ["train.steps=200", "mesh.shape=[1,-1,1]"])

Sources, later wins: the dataclass defaults, the YAML file (default: the packaged
``sft_jax/configs/demo.yaml``), then dotted ``key=value`` overrides whose values are parsed
as YAML scalars (``5`` is an int, ``1e-4`` a float, ``[2,2,2]`` a list, ``null`` None).
Unknown keys and wrong types raise ``ConfigError`` naming the valid keys; an override
given twice with different values is an error (MaxText's rule). Derived numbers are
methods, not keys.

The canonical YAMLs live in ``sft_jax/configs/`` (package data, so an installed
``python -m sft_jax.train`` finds its demo); the top-level ``configs/`` holds symlinks to
them so users browse and pass ``configs/NAME.yaml`` from a checkout. ``--config NAME``
(without ``.yaml``) also finds a packaged config by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import yaml

from sft_jax.data.config import DataConfig
from sft_jax.runtime.distributed import DistributedConfig
from sft_jax.models.family import preset_names
from sft_jax.models.layers.attention import ATTENTION_IMPLS
from sft_jax.models.layers.common import REMAT_POLICIES

MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
    """A user mistake in the config: unknown key, wrong type, impossible value."""


# --- sections ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoraSection:
    """Low-rank adapters (docs/lora.md): the base is frozen in the compute dtype, only adapters train."""

    rank: int = 0  # adapter rank r; 0 = off (full fine-tuning)
    alpha: float = 16.0  # scale numerator: updates are scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # dropout on the adapters' input in training (PEFT's lora_dropout); 0 = merged adapters
    targets: str = ""  # comma-separated module names (c_attn; q_proj,v_proj) or all-linear; empty = the family's default
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    init_from: str = "scratch"  # HF directory, hub name (gpt2, gpt2-medium, ...), or 'scratch'
    preset: str = "demo"  # architecture and size for init_from=scratch: any family's preset (docs/models.md)
    tokenizer: Optional[str] = None  # HF dir/hub name, or 'demo'; null = init_from's own ('demo' for scratch)
    n_positions: int = 1024  # context length for init_from=scratch (HF models bring their own)
    dtype: str = "bfloat16"  # compute dtype (weights stay float32): float32 | bfloat16 | float16
    remat: str = "none"  # rematerialisation: none | full | save_dots | offload
    attention: str = "auto"  # auto (by backend and dtype) | xla (reference) | cudnn_bias | cudnn_packed | pallas | splash
    scan_layers: bool = True  # scan the layer stack (one compiled block) instead of unrolling
    adapter: Optional[str] = None  # a PEFT LoRA adapter directory to start from (sets model.lora from its config)
    lora: LoraSection = LoraSection()  # low-rank adaptation instead of full fine-tuning

    def uses_lora(self) -> bool:
        """Whether training goes through adapters on a frozen base (docs/lora.md)."""
        return self.lora.rank > 0 or self.adapter is not None


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 0  # optimizer steps; 0 means derive from train.epochs
    epochs: float = 0.0  # passes over the training rows, used when train.steps is 0
    global_batch_size: int = 32  # rows per optimizer step, all devices and hosts together
    micro_batch_size: int = 0  # rows per accumulation micro-step (global); 0 = global_batch_size
    seed: int = 0  # seeds the parameter init and the data order
    log_every: int = 10  # host reads the on-device metrics every this many steps
    eval_every: int = 200  # eval loss/perplexity (and samples) every this many steps; 0 = end only
    eval_at_start: bool = False  # also evaluate before the first step (a baseline for the curves)
    eval_max_batches: int = 50  # cap on eval batches per evaluation; 0 = the whole eval split
    eval_samples: int = 3  # generated samples written to the log at each evaluation
    exact_match_examples: int = 0  # held-out prompts scored by greedy exact match (demo); 0 = off
    max_new_tokens: int = 64  # generation length for samples and exact match
    loss_chunk: int = 0  # positions per float32 logits chunk in the loss; 0 = whole sequence
    resume: str = "auto"  # auto (newest complete checkpoint in run.output_dir) | never | PATH
    compilation_cache: Optional[str] = "~/.cache/sft_jax/xla"  # persistent XLA cache dir; null = off


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many applied steps
    final_lr_fraction: float = 0.1  # cosine decays to lr * this at the last step
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled (AdamW) decay on matmul kernels only
    decay_embeddings: bool = False  # also decay wte/wpe (biases and LayerNorm never decay)
    clip_norm: float = 1.0  # clip gradients to this global L2 norm; 0 = no clipping
    max_nonfinite_steps: int = 10  # stop after this many consecutive skipped (NaN/inf) steps


@dataclasses.dataclass(frozen=True)
class MeshSection:
    # sizes of the (data, fsdp, tensor) axes; a dict or [data, fsdp, tensor]; -1 = the rest.
    # With dcn_shape, these are the sizes within one slice (ICI).
    shape: tuple = (-1, 1, 1)
    # multi-slice TPU: how many slices each axis spans over the data-center network (DCN),
    # like MaxText's dcn_* parallelism; keep DCN for data. (1, 1, 1) = one slice.
    dcn_shape: tuple = (1, 1, 1)

    @property
    def num_slices(self) -> int:
        return int(np.prod(self.dcn_shape))

    def sizes(self, n_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes over all ``n_devices`` (ICI x DCN); ConfigError if they do not fit."""
        if n_devices % self.num_slices:
            raise ConfigError(f"mesh.dcn_shape={_mesh_str(self.dcn_shape)} asks for {self.num_slices} slices, "
                              f"which do not divide {n_devices} devices")
        ici = self.ici_sizes(n_devices // self.num_slices)
        return tuple(i * d for i, d in zip(ici, self.dcn_shape))

    def ici_sizes(self, n_devices: int) -> tuple[int, int, int]:
        """Axis sizes within one slice of ``n_devices`` devices."""
        shape = list(self.shape)
        known = 1
        for s in shape:
            if s != -1:
                known *= s
        if -1 in shape:
            if n_devices % known:
                raise ConfigError(f"mesh.shape={_mesh_str(self.shape)} does not fit {n_devices} devices: "
                                  f"{n_devices} is not divisible by {known}")
            shape[shape.index(-1)] = n_devices // known
        if shape[0] * shape[1] * shape[2] != n_devices:
            raise ConfigError(f"mesh.shape={_mesh_str(self.shape)} needs {known} devices but {n_devices} are "
                              f"available; use -1 on one axis to take the rest")
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 500  # save every this many steps (and at the end); 0 = only at the end
    keep: int = 3  # newest checkpoints kept on disk
    async_save: bool = True  # write in the background while training continues


@dataclasses.dataclass(frozen=True)
class RunSection:
    output_dir: str = "runs/demo"  # run directory: config.yaml, metrics, report, checkpoints/, hf/; local or gs://
    # with a remote output_dir (gs://...), process 0 writes logs, report and export here and
    # copies them up when the run ends or is preempted; checkpoints go straight to the bucket
    staging_dir: str = "~/.cache/sft_jax/staging"
    export: bool = True  # export the final model to output_dir/hf (self-verifying)
    export_merged: bool = False  # with LoRA: also export the merged model to output_dir/hf (the adapter goes to adapter/)
    wandb_project: Optional[str] = None  # also log to this Weights & Biases project (pip install 'sft_jax[wandb]')
    wandb_name: Optional[str] = None  # the W&B run name; null = wandb's own


DEFAULT_REWARD_FN = "sft_jax.objectives.rewards:exact_match_reward"


@dataclasses.dataclass(frozen=True)
class PPOSection:
    """RL fine-tuning (``python -m sft_jax.ppo``). One rollout = ``rollout_prompts`` prompts x
    ``group_size`` answers; it is trained on for ``epochs`` passes of mini-batches of
    ``train.global_batch_size`` rows, so one rollout is epochs * rows / global_batch_size
    optimizer steps (``train.steps`` counts optimizer steps)."""

    advantage: str = "gae"  # gae (PPO with a critic) | grpo (group-relative, no critic)
    # the reward: a function module:function(prompts, responses, examples) -> list[float], or a
    # reward model (an HF GPT2ForSequenceClassification dir, e.g. python -m sft_jax.reward's
    # OUTPUT_DIR/hf). Set one; with neither, the demo's exact-match function (DEFAULT_REWARD_FN)
    reward_fn: Optional[str] = None
    reward_model: Optional[str] = None
    reward_norm: bool = False  # normalise rewards by a running mean and std (kept in checkpoints)
    rollout_prompts: int = 16  # prompts per rollout
    group_size: int = 1  # answers sampled per prompt (GRPO: the group, e.g. 8)
    epochs: int = 2  # passes over each rollout batch
    prompt_length: int = 48  # prompts are left-padded to this many tokens (a fixed shape)
    max_new_tokens: int = 16  # response length limit while sampling
    kl_coef: float = 0.05  # beta: weight of the KL to the reference (initial value if adaptive)
    kl_estimator: str = "k1"  # k1 | k3 (per-token KL estimator)
    kl_target: Optional[float] = None  # set: adaptive beta (Ziegler et al. 2019) aiming at this per-response KL
    kl_horizon: int = 10000  # adaptive controller's horizon (samples)
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # value clip epsilon
    value_coef: float = 0.5  # weight of the critic's loss in the summed loss
    whiten_advantages: bool = True  # PPO: whiten advantages over the rollout's response tokens
    eos_penalty: float = -1.0  # added to the reward of answers that do not end in EOS
    # actor (the SFT model's trunk + a zero value head) | reward (ppo.reward_model's trunk and
    # head: it must have the actor's architecture) | scratch
    critic_init: str = "actor"
    # under model.lora: adapters (the critic's own adapters and value head on the actor's frozen
    # base) | full (a whole trainable critic trunk, as without LoRA). Without LoRA: always full
    critic: str = "adapters"
    critic_lr: Optional[float] = None  # the critic's peak learning rate (same schedule); null: optim.lr
    eval_kl_prompts: int = 64  # held-out prompts sampled at temperature 1 for the KL metric


@dataclasses.dataclass(frozen=True)
class RewardSection:
    """``python -m sft_jax.reward``: a scalar head on the trunk, loss -log sigma(r_c - r_r - margin)."""

    margin: float = 0.0  # required score gap between chosen and rejected (0 = plain Bradley-Terry)


DPO_LOSS_TYPES = ("sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class DPOSection:
    """``python -m sft_jax.dpo``: the policy against a frozen reference (the starting model)."""

    beta: float = 0.1  # strength of the KL regularisation to the reference
    loss_type: str = "sigmoid"  # sigmoid (Rafailov et al.) | ipo (Azar et al., on summed log-probs)
    label_smoothing: float = 0.0  # sigmoid only: assumed probability that a preference label is flipped
    # weight of an SFT term on the chosen response, each pair's mean token NLL (RPO, Pang et al. 2024;
    # TRL's rpo_alpha): keeps the chosen answers likely while the margin grows. 0: plain DPO
    rpo_alpha: float = 0.0
    # compute the reference's log-probs of every training pair once, store them in the run
    # directory (keyed by example hash, reused on resume) instead of once per batch
    precompute_reference: bool = False
    kl_prompts: int = 64  # held-out prompts sampled (temperature 1) for the KL to the reference at each eval




@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = ModelSection()  # what to train
    data: DataConfig = DataConfig()  # what to train on (sft_jax.data)
    train: TrainSection = TrainSection()  # how long, batch sizes, evaluation, resume
    optim: OptimSection = OptimSection()  # AdamW + clipping + warmup-cosine
    mesh: MeshSection = MeshSection()  # device mesh
    checkpoint: CheckpointSection = CheckpointSection()  # orbax checkpoints
    run: RunSection = RunSection()  # where outputs go
    distributed: DistributedConfig = DistributedConfig()  # multi-process settings (sft_jax.runtime.distributed)
    ppo: PPOSection = PPOSection()  # RL fine-tuning (python -m sft_jax.ppo)
    reward: RewardSection = RewardSection()  # reward model (python -m sft_jax.reward)
    dpo: DPOSection = DPOSection()  # direct preference optimisation (python -m sft_jax.dpo)

    # --- derived numbers -------------------------------------------------------
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size or self.train.global_batch_size

    def accumulation_steps(self) -> int:
        return self.train.global_batch_size // self.micro_batch_size()

    def to_dict(self) -> dict:
        d = _plain(dataclasses.asdict(self))
        d["mesh"]["shape"] = dict(zip(MESH_AXES, self.mesh.shape))
        d["mesh"]["dcn_shape"] = dict(zip(MESH_AXES, self.mesh.dcn_shape))
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- loading ---------------------------------------------------------------------

def packaged_config(name: str) -> Path:
    """Path of a config shipped in the package, e.g. ``packaged_config('demo')``."""
    return Path(str(importlib.resources.files("sft_jax") / "configs" / f"{name}.yaml"))


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """YAML file (default: the packaged demo) plus ``key=value`` overrides -> validated Config."""
    file = _resolve_path(path)
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping of sections, got {type(raw).__name__}")
    seen: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if key in seen and seen[key] != value:
            raise ConfigError(f"{key} is given twice with different values: {seen[key]!r} and {value!r}")
        seen[key] = value
        _set_dotted(raw, key.split("."), value)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from nested plain values (the YAML shape)."""
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


def _resolve_path(path) -> Path:
    if path is None:
        return packaged_config("demo")
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.suffix == "" and packaged_config(str(p)).is_file():
        return packaged_config(str(p))
    shipped = sorted(q.stem for q in packaged_config("demo").parent.glob("*.yaml"))
    raise ConfigError(f"config file {str(path)!r} not found (packaged configs: {shipped})")


def _set_dotted(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        child = tree.get(k)
        if child is None:
            child = tree[k] = {}
        elif isinstance(child, list) and k == "shape":  # mesh.shape.data=2 on a list-form shape
            child = tree[k] = dict(zip(MESH_AXES, child))
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {k} is a value, not a section")
        tree = child
    tree[keys[-1]] = value


def _build(cls, raw, where: str):
    if dataclasses.is_dataclass(raw):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    if cls is DataConfig:
        return _build_data(raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])!r}; valid keys in "
                          f"{where or 'the top level'}: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        key = _join(where, name)
        t = hints[name]
        if dataclasses.is_dataclass(t):
            values[name] = _build(t, value, key)
        elif cls is MeshSection and name in ("shape", "dcn_shape"):
            values[name] = _mesh_shape(value, key, allow_rest=name == "shape")
        else:
            values[name] = _coerce(value, t, key)
    return cls(**values)


def _build_data(raw: dict) -> DataConfig:
    try:
        return DataConfig.from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:  # DataError is a ValueError
        msg = str(e) if str(e).startswith("data") else f"data: {e}"
        raise ConfigError(msg) from None


def _coerce(value, t, key: str):
    """Check ``value`` against the annotation ``t`` (int, float, bool, str, Optional[...])."""
    origin = typing.get_origin(t)
    if origin in (Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        (t,) = [a for a in args if a is not type(None)]
    if t is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(t)
    if not ok:
        raise ConfigError(f"{key}={value!r} has type {type(value).__name__}, expected {t.__name__}")
    return float(value) if t is float else value


def _mesh_shape(value, key: str = "mesh.shape", allow_rest: bool = True) -> tuple:
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(MESH_AXES))
        if unknown:
            raise ConfigError(f"unknown mesh axis {unknown[0]!r} in {key}; valid axes: {list(MESH_AXES)}")
        value = [value.get(a, 1) for a in MESH_AXES]
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{key}={value!r}: give a dict with keys {list(MESH_AXES)} or a list of 3 sizes")
    for axis, s in zip(MESH_AXES, value):
        if isinstance(s, bool) or not isinstance(s, int) or not ((s == -1 and allow_rest) or s >= 1):
            expected = "a positive int or -1 (the rest)" if allow_rest else "a positive int"
            raise ConfigError(f"{key}.{axis}={s!r}: expected {expected}")
    if list(value).count(-1) > 1:
        raise ConfigError(f"{key}={list(value)}: at most one axis can be -1")
    return tuple(value)


def _validate(cfg: Config) -> None:
    m, t, o, c = cfg.model, cfg.train, cfg.optim, cfg.checkpoint
    if m.init_from == "scratch" and m.preset not in preset_names():
        raise ConfigError(f"model.preset={m.preset!r}: choose one of {preset_names()}")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={m.dtype!r}: choose float32, bfloat16 or float16")
    if m.remat not in REMAT_POLICIES:
        raise ConfigError(f"model.remat={m.remat!r}: choose one of {list(REMAT_POLICIES)}")
    if m.attention not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention={m.attention!r}: choose one of {list(ATTENTION_IMPLS)}")
    if t.steps < 0 or t.epochs < 0 or (t.steps == 0 and t.epochs == 0):
        raise ConfigError("set train.steps > 0 (optimizer steps) or train.epochs > 0")
    if t.global_batch_size < 1 or t.micro_batch_size < 0:
        raise ConfigError("train.global_batch_size must be >= 1 and train.micro_batch_size >= 0")
    if t.global_batch_size % cfg.micro_batch_size():
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    for name in ("log_every",):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    for name in ("eval_every", "eval_max_batches", "eval_samples", "exact_match_examples", "loss_chunk"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0")
    if t.loss_chunk:
        lengths = [cfg.data.max_length] + ([b for b in cfg.data.buckets if b < cfg.data.max_length]
                                           if cfg.data.batching == "buckets" else [])
        if any(n % t.loss_chunk for n in lengths):
            raise ConfigError(f"train.loss_chunk={t.loss_chunk} must divide every row length {sorted(set(lengths))}")
    if t.max_new_tokens < 1:
        raise ConfigError(f"train.max_new_tokens={t.max_new_tokens} must be >= 1")
    if m.init_from == "scratch" and t.max_new_tokens >= m.n_positions:  # HF models: checked once their config is read
        raise ConfigError(f"train.max_new_tokens={t.max_new_tokens} leaves no room for a prompt in "
                          f"model.n_positions={m.n_positions}; it must be smaller")
    if not t.resume:
        raise ConfigError("train.resume: use auto, never, or a checkpoint directory")
    if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.final_lr_fraction <= 1:
        raise ConfigError("optim.lr must be > 0, optim.warmup_steps >= 0, optim.final_lr_fraction in [0, 1]")
    if o.clip_norm < 0 or o.weight_decay < 0 or o.max_nonfinite_steps < 1:
        raise ConfigError("optim.clip_norm and optim.weight_decay must be >= 0, optim.max_nonfinite_steps >= 1")
    if c.every < 0 or c.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    _validate_ppo(cfg)
    _validate_preference(cfg)
    _validate_lora(cfg)


def _validate_lora(cfg: Config) -> None:
    lo = cfg.model.lora
    if lo.rank < 0 or (lo.rank == 0 and lo != LoraSection(rank=lo.rank)):
        raise ConfigError(f"model.lora.rank={lo.rank}: set a rank >= 1 to use the other model.lora fields")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout={lo.dropout}: expected 0 <= dropout < 1")
    if lo.alpha <= 0:
        raise ConfigError(f"model.lora.alpha={lo.alpha}: expected > 0")


def _validate_ppo(cfg: Config) -> None:
    p = cfg.ppo
    if p.advantage not in ("gae", "grpo"):
        raise ConfigError(f"ppo.advantage={p.advantage!r}: choose gae or grpo")
    if p.kl_estimator not in ("k1", "k3"):
        raise ConfigError(f"ppo.kl_estimator={p.kl_estimator!r}: choose k1 or k3")
    if p.reward_fn is not None and p.reward_model is not None:
        raise ConfigError(f"ppo.reward_fn={p.reward_fn!r} and ppo.reward_model={p.reward_model!r} are both set: "
                          f"choose one reward")
    if p.reward_fn is not None and ":" not in p.reward_fn:
        raise ConfigError(f"ppo.reward_fn={p.reward_fn!r}: expected module:function")
    if min(p.rollout_prompts, p.group_size, p.epochs, p.prompt_length, p.max_new_tokens) < 1:
        raise ConfigError("ppo.rollout_prompts, group_size, epochs, prompt_length, max_new_tokens must be >= 1")
    if p.advantage == "grpo" and p.group_size < 2:
        raise ConfigError(f"ppo.group_size={p.group_size}: GRPO needs >= 2 answers per prompt")
    if p.kl_target is not None and p.kl_target <= 0:
        raise ConfigError("ppo.kl_target must be > 0 (or null for a fixed ppo.kl_coef)")
    if p.critic_init not in ("actor", "reward", "scratch"):
        raise ConfigError(f"ppo.critic_init={p.critic_init!r}: choose actor, reward or scratch")
    if p.critic_init == "reward" and p.reward_model is None:
        raise ConfigError("ppo.critic_init=reward needs ppo.reward_model (the model the critic starts from)")
    if p.critic not in ("adapters", "full"):
        raise ConfigError(f"ppo.critic={p.critic!r}: choose adapters or full")
    if cfg.model.uses_lora() and p.advantage == "gae" and p.critic == "adapters" and p.critic_init != "actor":
        raise ConfigError(f"ppo.critic_init={p.critic_init} with ppo.critic=adapters: the critic's adapters sit on "
                          f"the actor's frozen base; set ppo.critic=full to give the critic a trunk of its own")
    if p.critic_lr is not None and p.critic_lr < 0:
        raise ConfigError(f"ppo.critic_lr={p.critic_lr}: expected >= 0 (or null for optim.lr)")


def _validate_preference(cfg: Config) -> None:
    d = cfg.dpo
    if d.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"dpo.loss_type={d.loss_type!r}: choose one of {list(DPO_LOSS_TYPES)}")
    if not d.beta > 0:
        raise ConfigError(f"dpo.beta={d.beta}: expected > 0")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={d.label_smoothing}: expected 0 <= label_smoothing < 0.5")
    if not d.rpo_alpha >= 0.0:
        raise ConfigError(f"dpo.rpo_alpha={d.rpo_alpha}: expected >= 0")
    if d.loss_type == "ipo" and d.label_smoothing:
        raise ConfigError("dpo.label_smoothing applies to dpo.loss_type=sigmoid only")
    if d.kl_prompts < 0:
        raise ConfigError(f"dpo.kl_prompts={d.kl_prompts}: expected >= 0")
    if cfg.reward.margin < 0:
        raise ConfigError(f"reward.margin={cfg.reward.margin}: expected >= 0")


def _plain(x):
    """Tuples to lists, recursively, so the tree dumps as plain YAML."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _mesh_str(shape) -> str:
    return "{" + ", ".join(f"{a}: {s}" for a, s in zip(MESH_AXES, shape)) + "}"


if __name__ == "__main__":  # python -m sft_jax.config --markdown: the reference page, docs/configuration.md
    import sys

    from sft_jax import configref

    sys.exit(configref.main())
