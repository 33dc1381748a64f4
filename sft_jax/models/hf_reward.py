"""The reward model's Hugging Face face for every family: export as the family's
``*ForSequenceClassification`` class, self-verified, and import.

A reward model is a family's trunk plus a bias-free scalar head (``{"score": {"kernel": (D, 1)}}``, see
sft_jax.models.layers.common.scores_at). HF keeps that head under the family's ``score_key``
(``score.weight``, (1, D)), a Linear's (out, in) layout, so it is the kernel transposed. transformers reads
the score at the rightmost token that is not ``pad_token_id``; with pad = eos that is the last response token
before its closing eos, where the JAX side reads it too (``heads.reward_read_position``). Everything else
(trunk tensors, config, tokenizer, atomic replace) is sft_jax.models.hf_io's export.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models import hf_io as hf
from sft_jax.models.family import ModelConfig, family_of, get_family
from sft_jax.models.heads import reward_read_position
from sft_jax.models.layers.common import scores_at

VERIFY_LENGTHS = (16, 11, 5, 1)  # tokens per verification row before its closing eos; rows right-padded with eos


def is_reward_config(config: dict) -> bool:
    """True for an HF ``config.json`` of a supported family's reward-model class."""
    try:
        family = get_family(config.get("model_type"))
    except ValueError:
        return False
    return family.reward_classes[config["model_type"]] in (config.get("architectures") or [])


def verify_rows(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fixed rows of different lengths, each content + eos right-padded with eos, and the index of each row's
    last content token (where the score is read)."""
    T = min(max(VERIFY_LENGTHS) + 2, cfg.max_position_embeddings)
    tokens = np.full((len(VERIFY_LENGTHS), T), cfg.eos_token_id, np.int64)
    index = np.zeros(len(VERIFY_LENGTHS), np.int64)
    for b, n in enumerate(VERIFY_LENGTHS):
        n = min(n, T - 1)
        content = (np.arange(n) * 7919 + 13 * (b + 1)) % cfg.vocab_size
        content[content == cfg.eos_token_id] = (cfg.eos_token_id + 1) % cfg.vocab_size
        tokens[b, :n] = content
        index[b] = reward_read_position(0, n + 1)  # n content tokens and their eos
    return tokens, index


@functools.partial(jax.jit, static_argnums=0)
def _scores(cfg: ModelConfig, params, head, tokens, index):
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    segments = (jnp.arange(T)[None] <= index[:, None] + 1).astype(jnp.int32)  # content + its eos; padding 0
    hidden = family_of(cfg).module(cfg).apply(params, tokens, positions, segments, return_hidden=True)
    return scores_at(head, hidden, index[:, None])[:, 0]


def jax_scores(params, head: dict, cfg: ModelConfig, tokens, index) -> np.ndarray:
    """Float32 scores of rows (B, T) read at positions `index` (B,), full-precision matmuls."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(_scores(cfg.replace(dtype="float32"), params, head, jnp.asarray(tokens, jnp.int32),
                                  jnp.asarray(index, jnp.int32)))


def export_reward_hf(params, head: dict, cfg: ModelConfig, out_dir, *, tokenizer=None,
                     chat_template: str | None = None, verify: bool = True, overwrite: bool = False):
    """Write a float32 dir of the family's reward class (num_labels 1, pad = eos), verify it, move it into
    place; returns sft_jax.models.hf_io.ExportReport. On failure nothing is left at ``out_dir``."""
    family = family_of(cfg)
    kernel = np.asarray(jax.device_get(head["score"]["kernel"]), np.float32)
    if kernel.shape != (cfg.hidden_size, 1):
        raise hf.HFFormatError(f"reward head kernel has shape {kernel.shape}, expected {(cfg.hidden_size, 1)}")
    out, staging = hf.staging_dir(out_dir, overwrite)
    try:
        # The trunk goes through the LM export (and its logit checks); then the head and the config.
        report = hf.export_hf(params, cfg, staging / "model", tokenizer=tokenizer, chat_template=chat_template,
                              verify=verify)
        tmp = staging / "model"
        from safetensors.numpy import load_file

        tensors = load_file(str(tmp / "model.safetensors"))
        tensors[family.score_key] = np.ascontiguousarray(kernel.T)  # (1, D)
        hf.write_safetensors(tensors, tmp / "model.safetensors")
        config = json.loads((tmp / "config.json").read_text())
        config.update(architectures=[family.reward_classes[cfg.model_type]], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                      pad_token_id=cfg.eos_token_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        report.out_dir = str(out)
        if verify:
            _verify(params, head, cfg, tmp, report)
        hf.move_into_place(tmp, out)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _verify(params, head: dict, cfg: ModelConfig, tmp: Path, report) -> None:
    """JAX reload gives bit-identical scores; transformers' scores are within hf.HF_ATOL of JAX's."""
    tokens, index = verify_rows(cfg)
    want = jax_scores(params, head, cfg, tokens, index)
    cfg2, params2, head2 = load_reward_hf(tmp)
    got = jax_scores(params2, head2, cfg2, tokens, index)
    diff = float(np.max(np.abs(got - want)))
    report.max_abs_diff["reward_jax_reload"] = diff
    if diff != 0.0:
        raise hf.HFFormatError(f"reward export verification failed: reloaded scores differ by {diff:.3g} (must be 0)")
    report.checks.append("jax reload: float32 reward scores bit-identical")
    try:
        import torch
        import transformers
    except ImportError:
        report.checks.append("transformers reward scores: skipped (torch not importable)")
        return
    reward_class = family_of(cfg).reward_classes[cfg.model_type]
    model = getattr(transformers, reward_class).from_pretrained(str(tmp), dtype=torch.float32).eval()
    with torch.no_grad():  # no attention mask: right padding with eos, as a user scores a batch
        hf_scores = model(torch.from_numpy(tokens)).logits[:, 0].numpy()
    diff = float(np.max(np.abs(hf_scores - want)))
    report.max_abs_diff["reward_transformers"] = diff
    if not diff <= hf.HF_ATOL:
        raise hf.HFFormatError(f"reward export verification failed: transformers scores differ from JAX by "
                               f"{diff:.3g} > {hf.HF_ATOL:g}")
    report.checks.append(f"transformers {reward_class} scores within {diff:.3g} of JAX on "
                         f"right-padded rows of lengths {list(VERIFY_LENGTHS)} (tol {hf.HF_ATOL:g})")


def load_reward_hf(path_or_name, *, shardings=None, **compute_overrides) -> tuple[ModelConfig, dict, dict]:
    """(model config, trunk params, head) from a dir of a family's reward class with one label and pad = eos."""
    directory = hf.resolve_dir(str(path_or_name))
    config_file = directory / "config.json"
    config = hf.read_hf_config(directory)
    try:
        family = get_family(config.get("model_type"))
    except ValueError as e:
        raise hf.HFFormatError(f"{config_file}: {e}") from e
    reward_class = family.reward_classes[config["model_type"]]
    if reward_class not in (config.get("architectures") or []):
        raise hf.HFFormatError(f"{config_file}: architectures={config.get('architectures')}, "
                               f"expected [{reward_class!r}]")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise hf.HFFormatError(f"{config_file}: {labels} labels; a reward model has one (num_labels 1)")
    cfg, params = hf.load_hf(directory, shardings=shardings, extra_keys=(family.score_key,), **compute_overrides)
    if config.get("pad_token_id") != cfg.eos_token_id:
        raise hf.HFFormatError(f"{config_file}: pad_token_id={config.get('pad_token_id')} is not the eos token "
                               f"{cfg.eos_token_id}; scores would be read at another position than sft_jax reads them")
    source = hf._Checkpoint(directory, family.key_map(cfg).prefix)
    if family.score_key not in source.where:
        raise hf.HFFormatError(f"{directory}: missing tensor {family.score_key!r} (the reward head)")
    f, raw = source.where[family.score_key]
    if f.shape(raw) != (1, cfg.hidden_size):
        raise hf.HFFormatError(f"{f.path}: tensor {raw!r} has shape {f.shape(raw)}, expected {(1, cfg.hidden_size)}")
    kernel = f.read(raw, (slice(None), slice(None))).T  # (D, 1)
    return cfg, params, {"score": {"kernel": jnp.asarray(np.ascontiguousarray(kernel))}}
