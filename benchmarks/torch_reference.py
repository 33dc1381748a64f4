"""The PyTorch side of ``python -m sft_jax.bench``: HF transformers' causal LM of the model's family
(``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...) doing the same SFT step as sft_jax (same weights,
batch, clipping, AdamW and schedule), eager or under ``torch.compile``. Loaded by
``sft_jax.bench.torch_reference``."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.bench import OPTIM, _result, _timed
from sft_jax.core.optimizer import make_optimizer
from sft_jax.models.family import ModelConfig, family_of
from sft_jax.models.hf_io import to_hf_state_dict


def torch_model(cfg: ModelConfig, params: dict, device: str):
    """The family's HF causal LM (SDPA attention) holding the same weights as ``params``."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**{**cfg.to_hf_config(), "use_cache": False},
                                                  attn_implementation="sdpa")
    model = getattr(transformers, family_of(cfg).causal_lm_classes[cfg.model_type])(hf_config)
    model.loss_type = "ForCausalLM"  # HF's name-based lookup misses some classes and warns; same loss either way
    state = {k: torch.from_numpy(v) for k, v in to_hf_state_dict(params, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied lm_head is the embedding, not in the state
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device)


def embedding_keys(cfg: ModelConfig) -> set[str]:
    """HF names of the embedding tables (sft_jax's optimizer does not decay them by default)."""
    family = family_of(cfg)
    keys = family.key_map(cfg)
    return {keys.prefix + key for key, path, _, _ in keys.global_layout if path in family.embedding_names}


def run_torch(cfg: ModelConfig, params: dict, hf_batch: dict, *, steps: int, warmup: int, compile: bool = False) -> dict:
    """HF eager (or ``compile=True``: ``torch.compile`` of the same model) on ``hf_batch``;
    ``position_ids`` and a 4D ``attention_mask`` are passed through when present (packed rows)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = torch_model(cfg, params, device).train()
    torch_remat = cfg.remat == "full"  # HF has no save-the-matmuls policy: save_dots runs without recompute
    if torch_remat:
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable()
    optim = dataclasses.replace(OPTIM, warmup_steps=warmup)

    embeddings = embedding_keys(cfg)

    def decays(name, p):  # sft_jax.core.optimizer's decay mask in HF names: matmul weights, not embeddings/biases/norms
        return p.ndim == 2 and name not in embeddings

    named = list(model.named_parameters())  # a tied lm_head is listed once, as the embedding
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": optim.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps, fused=cuda)
    _, schedule = make_optimizer(optim, warmup + steps)
    lrs = np.asarray(jax.vmap(schedule)(jnp.arange(warmup + steps + 1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lrs[min(s, len(lrs) - 1)]) / optim.lr)
    ids = torch.from_numpy(hf_batch["input_ids"]).to(device)
    labels = torch.from_numpy(hf_batch["labels"]).to(device)
    extra = {k: torch.from_numpy(np.ascontiguousarray(hf_batch[k])).to(device)
             for k in ("position_ids", "attention_mask") if k in hf_batch}
    forward = torch.compile(model) if compile else model
    autocast = cuda and cfg.dtype != "float32"
    amp = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if autocast else contextlib.nullcontext()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def one_step():
        with amp:
            loss = forward(input_ids=ids, labels=labels, **extra).loss
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
    supervised = int((hf_batch["labels"][:, 1:] != -100).sum())
    result = _result("torch.compile" if compile else "torch", cfg, B, T, first_loss, step_time, peak, kind,
                     supervised=supervised, compute_dtype=cfg.dtype if autocast else "float32",
                     remat="full" if torch_remat else "none",
                     attention="sdpa, 4D block-diagonal mask" if "attention_mask" in hf_batch else "sdpa causal")
    del model, forward, opt
    if cuda:
        torch.cuda.empty_cache()  # hand the memory back before JAX runs
    return result
