"""A reward model: a model family's trunk plus a bias-free scalar head, trained on preference pairs.

Parameters: ``{"params": trunk, "head": {"score": {"kernel": (D, 1)}}}``. The score of a
sequence is the head read at its last response token that is not EOS (the position
transformers' ``*ForSequenceClassification`` reads with pad = EOS); the loss of a pair
is -log sigma(r_chosen - r_rejected - reward.margin). Starts from ``model.init_from`` (an
HF causal-LM directory such as an SFT run's ``hf/`` export, or a reward model's export,
whose head it then keeps); a fresh head is drawn from the seed. Metrics: loss, pairwise
accuracy, mean margin, on train and held-out pairs. Export: a self-verifying directory of the
family's ``*ForSequenceClassification`` class (GPT-2: ``GPT2ForSequenceClassification``) at ``OUTPUT_DIR/hf``.
Under ``model.lora`` the trunk is adapters on a frozen base and the head trains whole; the
adapter directory saves the head as PEFT's ``modules_to_save`` (sft_jax.adapters.objective).
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.data import chat_template
from sft_jax.models.family import family_of
from sft_jax.objectives import sft
from sft_jax.objectives.base import Objective
from sft_jax.objectives.pairs import PairData, summed
from sft_jax.objectives.preference_losses import as_pairs, init_reward_head, reward_loss, reward_scores

HEAD_SEED_OFFSET = 1  # the head's key is fold_in(key(seed), 1); the trunk's is key(seed)


def is_reward_dir(directory) -> bool:
    """True for an HF directory of a family's reward class (a reward model export)."""
    from sft_jax.models.hf_reward import is_reward_config

    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return is_reward_config(config)


class RewardObjective(PairData, Objective):
    metric_names = ("accuracy", "margin")
    supports_lora = True  # adapters on the trunk; the score head trains whole
    lora_task = "SEQ_CLS"

    def __init__(self, config, model_cfg, tokenizer, hf_dir=None):
        super().__init__(config, model_cfg, tokenizer, hf_dir)
        self.margin = config.reward.margin

    # --- parameters -------------------------------------------------------------------------
    def abstract_params(self):
        head = jax.eval_shape(lambda: nn.Partitioned(jnp.zeros((self.model_cfg.hidden_size, 1), jnp.float32),
                                                     names=("embed", None)))
        trunk = family_of(self.model_cfg).param_shapes(self.model_cfg)["params"]
        return {"params": trunk, "head": {"score": {"kernel": head}}}

    def init_params(self, key):
        return {"params": sft.init_params(self.model_cfg, key)["params"],
                "head": init_reward_head(self.model_cfg, jax.random.fold_in(key, HEAD_SEED_OFFSET))}

    def initial_params(self, shardings):
        if self.hf_dir is None:
            return None
        from sft_jax.models import hf_io
        from sft_jax.models.hf_reward import load_reward_hf

        trunk_sh = {"params": shardings["params"]}
        if is_reward_dir(self.hf_dir):
            _, trunk, head = load_reward_hf(self.hf_dir, shardings=trunk_sh, dtype=self.model_cfg.dtype)
        else:
            trunk = hf_io.load_hf(self.hf_dir, shardings=trunk_sh, dtype=self.model_cfg.dtype)[1]
            key = jax.random.fold_in(jax.random.key(self.config.train.seed), HEAD_SEED_OFFSET)
            head = init_reward_head(self.model_cfg, key)
        return {"params": trunk["params"], "head": jax.device_put(head, shardings["head"])}

    # --- the step -----------------------------------------------------------------------------
    def pair_loss(self, params, batch):
        scores = as_pairs(reward_scores(params["params"], params["head"], batch, self.model_cfg))
        return reward_loss(scores[..., 0], scores[..., 1], batch["pair_mask"], margin=self.margin, normalizer=1.0)

    def loss(self, params, frozen, batch):
        total, metrics = self.pair_loss(params, batch)
        return total, summed(metrics, self.metric_names)

    def eval_sums(self, params, frozen, batch):
        total, metrics = self.pair_loss(params, batch)
        return total, *summed(metrics, self.metric_names).values(), metrics["pairs"]

    def head_tensors(self, params) -> dict:
        kernel = params["head"]["score"]["kernel"]  # (D, 1); HF's Linear stores (1, D)
        return {family_of(self.model_cfg).score_key: np.asarray(kernel, np.float32).T}

    # --- evaluation and export ----------------------------------------------------------------
    def evaluate(self, loop, step: int) -> dict:
        sums = self.held_out_sums(loop)
        if sums is None:
            return {}
        loss, accuracy, margin, pairs = sums
        pairs = max(pairs, 1.0)
        return {"eval_loss": loss / pairs, "eval_accuracy": accuracy / pairs, "eval_margin": margin / pairs}

    def export(self, loop, out: Path) -> list[str]:
        export_dir = out / "hf"
        params = loop.host_params()
        if jax.process_index() == 0:
            from sft_jax.models.hf_reward import export_reward_hf

            export_reward_hf({"params": params["params"]}, params["head"],
                             self.model_cfg.replace(dtype="float32", remat="none"), export_dir,
                             tokenizer=self.tokenizer, chat_template=chat_template(self.config.data), verify=True,
                             overwrite=True)
        reward_class = family_of(self.model_cfg).reward_classes[self.model_cfg.model_type]
        return [f"HF export:   {export_dir} ({reward_class})",
                f"score pairs: python -m sft_jax.reward score --model {export_dir} --data FILE"]
