"""PPO with a per-token KL penalty to the SFT model (InstructGPT), and GRPO, on the training core.

One *rollout* every ``updates_per_rollout`` optimizer steps (the core's ``rollout`` hook):

1. ``ppo.rollout_prompts`` training prompts, each ``ppo.group_size`` times, left-padded to
   ``ppo.prompt_length``; responses sampled from pi at temperature 1 by the jitted KV-cache
   sampler (``sft_jax.sampling``), all rows in one call, no host round trip per token.
2. One batched pass gives the old log-probs (pi), reference log-probs (the frozen SFT
   model) and the critic's values of every response token.
3. The reward function ``module:function(prompts, responses, examples)`` scores the
   decoded answers; answers without EOS get ``ppo.eos_penalty`` added.
4. PPO: per-token reward = score at the last response token - beta * KL at every response
   token, GAE, whitened advantages. GRPO: group-relative advantages, no critic; the KL
   (k3) to the reference goes into the loss instead.

The rollout is then trained on for ``ppo.epochs`` passes of shuffled mini-batches of
``train.global_batch_size`` rows, one mini-batch per optimizer step. Trainable parameters
are one tree, ``{"params": actor, "critic": {"trunk": GPT-2, "head": value head}}`` (PPO)
or ``{"params": actor}`` (GRPO), so the core's checkpointing, resume and optimizer hold
both; the loss is the actor's plus ``ppo.value_coef`` times the critic's.
"""

from __future__ import annotations

import importlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import sharding as shd
from sft_jax.config import ConfigError
from sft_jax.data import build_datasets, encode_prompt, report_to_markdown
from sft_jax.data.formats import decode
from sft_jax.model import GPT2, lm_logits, param_shapes
from sft_jax.objectives import rl_losses as rl
from sft_jax.objectives import sft
from sft_jax.objectives.base import Data

ROW_KEYS = ("tokens", "positions", "segment_ids", "targets", "mask", "old_logp", "ref_logp", "advantages",
            "old_values", "returns", "beta")
# filter_logits keeps tokens whose preceding mass is < top_p; 2.0 keeps every token, so the
# sampled distribution is softmax(logits) exactly, the one old log-probs are computed under
NO_NUCLEUS = 2.0


def load_reward_fn(spec: str):
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"ppo.reward_fn={spec!r}: cannot load it ({e})") from None
    return fn


def actor_logps(model: GPT2, actor, batch) -> tuple[jax.Array, jax.Array]:
    """(log pi(target_t | prefix), entropy at t), each (B,T) float32."""
    hidden = model.apply({"params": actor}, batch["tokens"], batch["positions"], batch["segment_ids"],
                         return_hidden=True)
    logits = lm_logits(actor["wte"], hidden, model.config)  # (B,T,V)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return picked - logz, rl.entropy_from_logits(logits)


def critic_values(model: GPT2, critic, batch) -> jax.Array:
    """The critic's value at each position, (B,T) float32: a linear head on a GPT-2 trunk."""
    hidden = model.apply({"params": critic["trunk"]}, batch["tokens"], batch["positions"], batch["segment_ids"],
                         return_hidden=True)
    return jnp.einsum("BTD,D->BT", hidden.astype(jnp.float32), critic["head"]["kernel"]) + critic["head"]["bias"][0]


class RolloutIterator:
    """The core's iterator: step n belongs to rollout n // updates_per_rollout, whose prompts
    are the next ``prompts_per_rollout`` of a per-epoch permutation. Its state (saved in
    every checkpoint) is the step and the KL controller's beta."""

    def __init__(self, n_prompts: int, prompts_per_rollout: int, updates_per_rollout: int, seed: int, kl_ctl):
        self.n, self.per, self.updates = n_prompts, prompts_per_rollout, updates_per_rollout
        self.seed, self.kl_ctl = seed, kl_ctl
        self.rollouts_per_epoch = max(1, n_prompts // prompts_per_rollout)
        self.steps_per_epoch = self.rollouts_per_epoch * updates_per_rollout
        self.step = 0

    def __next__(self) -> dict:
        r, j = divmod(self.step, self.updates)
        epoch, k = divmod(r, self.rollouts_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        self.step += 1
        return {"rollout": r, "update": j, "indices": order[k * self.per:(k + 1) * self.per]}

    def state(self) -> dict:
        return {"step": self.step, "beta": self.kl_ctl.beta}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])
        self.kl_ctl.beta = float(state.get("beta", self.kl_ctl.beta))

    def close(self) -> None:
        pass


class PPOObjective(sft.SFTObjective):
    """PPO (``ppo.advantage=gae``) or GRPO (``ppo.advantage=grpo``); SFT's held-out exact
    match and export, on the actor."""

    def __init__(self, config, model_cfg, tokenizer, hf_dir=None):
        super().__init__(config, model_cfg, tokenizer, hf_dir)
        p = self.ppo = config.ppo
        self.with_critic = p.advantage == "gae"
        self.rows = p.rollout_prompts * p.group_size
        if self.rows % config.train.global_batch_size:  # checked here, not in config: SFT configs need not fit it
            raise ConfigError(f"ppo.rollout_prompts x ppo.group_size = {self.rows} rows per rollout is not a "
                              f"multiple of train.global_batch_size={config.train.global_batch_size}")
        self.mini_batches = self.rows // config.train.global_batch_size
        self.updates_per_rollout = p.epochs * self.mini_batches
        self.length = p.prompt_length + p.max_new_tokens
        if self.length > model_cfg.n_positions:
            raise ConfigError(f"ppo.prompt_length + ppo.max_new_tokens = {self.length} exceeds the model's "
                              f"{model_cfg.n_positions} positions")
        self.reward_fn = load_reward_fn(p.reward_fn)
        self.kl_ctl = (rl.FixedKLController(p.kl_coef) if p.kl_target is None else
                       rl.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon))
        self.batch_axes = {k: ("batch",) if k == "beta" else ("batch", "length") for k in ROW_KEYS}
        self.metric_names = ("pg_loss", "value_loss", "clipfrac", "value_clipfrac", "ratio", "ratio_dev",
                             "entropy", "kl")
        self.cache = None  # (rollout index, arrays of the whole rollout, per-epoch row orders)
        self._score = jax.jit(self._score_rows)

    # --- parameters ---------------------------------------------------------------------------
    def abstract_params(self):
        actor = param_shapes(self.model_cfg)
        if not self.with_critic:
            return actor
        D = self.model_cfg.n_embd
        box = lambda shape, names: nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names=names)
        head = {"kernel": box((D,), ("embed",)), "bias": box((1,), (None,))}
        return {"params": actor["params"], "critic": {"trunk": actor["params"], "head": head}}

    def _with_critic(self, actor, trunk):
        if not self.with_critic:
            return {"params": actor}
        head = {"kernel": jnp.zeros((self.model_cfg.n_embd,), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}
        return {"params": actor, "critic": {"trunk": trunk, "head": head}}

    def init_params(self, key):
        actor = sft.init_params(self.model_cfg, key)["params"]
        trunk = actor if self.ppo.critic_init == "actor" else sft.init_params(
            self.model_cfg, jax.random.fold_in(key, 1))["params"]
        return self._with_critic(actor, trunk)

    def initial_params(self, shardings):
        if self.hf_dir is None:
            return None
        from sft_jax import hf

        load = lambda sh: hf.load_hf(self.hf_dir, shardings={"params": sh}, dtype=self.model_cfg.dtype)[1]["params"]
        actor = load(shardings["params"])
        if not self.with_critic:
            return {"params": actor}
        trunk = load(shardings["critic"]["trunk"]) if self.ppo.critic_init == "actor" else jax.jit(
            lambda k: sft.init_params(self.model_cfg, k)["params"], out_shardings=shardings["critic"]["trunk"])(
            jax.random.key(self.config.train.seed + 1))
        params = self._with_critic(actor, trunk)
        params["critic"]["head"] = jax.device_put(params["critic"]["head"], shardings["critic"]["head"])
        return params

    def frozen_params(self, mesh):
        """The reference model: the starting actor, rebuilt from its source on every start."""
        shardings = shd.logical_shardings(mesh, param_shapes(self.model_cfg))
        if self.hf_dir is not None:
            from sft_jax import hf

            return hf.load_hf(self.hf_dir, shardings=shardings, dtype=self.model_cfg.dtype)[1], shardings
        params = jax.jit(lambda k: {"params": sft.init_params(self.model_cfg, k)["params"]},
                         out_shardings=shardings)(jax.random.key(self.config.train.seed))
        return params, shardings

    def decoding_params(self, loop):
        return {"params": loop.host_params()["params"]}

    # --- data ---------------------------------------------------------------------------------
    def build_data(self) -> Data:
        c = self.config
        train_ds, eval_ds, report = build_datasets(c.data, self.tokenizer, n_positions=self.model_cfg.n_positions,
                                                   vocab_size=self.model_cfg.vocab_size, seed=c.train.seed)
        self.train_examples = train_ds.examples
        if len(self.train_examples) < self.ppo.rollout_prompts:
            raise ConfigError(f"ppo.rollout_prompts={self.ppo.rollout_prompts} exceeds the "
                              f"{len(self.train_examples)} training prompts")
        iterator = RolloutIterator(len(self.train_examples), self.ppo.rollout_prompts, self.updates_per_rollout,
                                   c.train.seed, self.kl_ctl)
        return Data(iterator, eval_ds, report_to_markdown(report))

    # --- the rollout hook -----------------------------------------------------------------------
    def rollout(self, loop, step, batch):
        r, j = batch["rollout"], batch["update"]
        if self.cache is None or self.cache[0] != r:
            # a resume in the middle of a rollout's updates samples it again from the current
            # parameters (not bit-equal to the uninterrupted run; checkpoint at rollout ends)
            arrays, stats = self.make_rollout(loop, [self.train_examples[i] for i in batch["indices"]],
                                              seed=self.config.train.seed * 1_000_003 + r)
            self.kl_ctl.update(stats["kl_per_response"], self.rows)
            stats.update(beta=self.kl_ctl.beta, rollout=r)
            loop.logger.log_split(step, "rollout", stats)
            rng = np.random.default_rng([self.config.train.seed, r, 1])
            self.cache = (r, arrays, [rng.permutation(self.rows) for _ in range(self.ppo.epochs)])
        _, arrays, orders = self.cache
        epoch, k = divmod(j, self.mini_batches)
        G = self.config.train.global_batch_size
        rows = orders[epoch][k * G:(k + 1) * G]
        per_process = G // jax.process_count()
        rows = rows[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
        return {key: value[rows] for key, value in arrays.items()}

    def prompt_rows(self, examples, repeat: int):
        """Left-padded prompt tokens (R, prompt_length), lengths (R,), and the prompts' ids."""
        P, eos = self.ppo.prompt_length, self.tokenizer.eos_token_id
        ids = [encode_prompt(self.tokenizer, self.config.data, ex) for ex in examples]
        too_long = max(len(x) for x in ids)
        if too_long > P:
            raise ConfigError(f"a prompt has {too_long} tokens > ppo.prompt_length={P}; raise ppo.prompt_length")
        ids = [x for x in ids for _ in range(repeat)]
        tokens = np.full((len(ids), P), eos, np.int32)
        for row, x in zip(tokens, ids):
            row[P - len(x):] = x
        return tokens, np.array([len(x) for x in ids], np.int32), ids

    def sample(self, params, prompt_tokens, lengths, seed: int, greedy: bool = False) -> np.ndarray:
        from sft_jax.sampling import _decode

        eos = self.tokenizer.eos_token_id
        return np.asarray(_decode({"params": params["params"]}, jnp.asarray(prompt_tokens), jnp.asarray(lengths),
                                  jax.random.key(seed), jnp.float32(1.0), jnp.float32(NO_NUCLEUS), jnp.int32(eos),
                                  cfg=self.model_cfg, max_new_tokens=self.ppo.max_new_tokens, greedy=greedy,
                                  top_k=0))

    def sequences(self, prompt_tokens, lengths, responses):
        """The (R, L) arrays of prompt + response that the batched passes and the loss read.

        Position t predicts ``targets[t]`` = token t+1; ``mask[t]`` is 1 where that target
        is a response token (up to and including its EOS)."""
        eos = self.tokenizer.eos_token_id
        R, P = prompt_tokens.shape
        N = responses.shape[1]
        is_eos = responses == eos
        has_eos = is_eos.any(axis=1)
        n_resp = np.where(has_eos, is_eos.argmax(axis=1) + 1, N)  # tokens up to and including EOS
        tokens = np.concatenate([prompt_tokens, responses], axis=1)
        slot = np.arange(P + N)[None, :]
        first_real = (P - lengths)[:, None]
        segment_ids = ((slot >= first_real) & (slot < P + n_resp[:, None])).astype(np.int32)
        positions = np.maximum(slot - first_real, 0).astype(np.int32)
        targets = np.concatenate([tokens[:, 1:], np.full((R, 1), eos, np.int32)], axis=1)
        mask = ((slot >= P - 1) & (slot < P - 1 + n_resp[:, None])).astype(np.float32)
        return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, targets=targets, mask=mask), \
            has_eos, n_resp

    def _score_rows(self, params, frozen, rows):
        logp, entropy = actor_logps(self.model, params["params"], rows)
        ref_logp, _ = actor_logps(self.model, frozen["params"], rows)
        values = critic_values(self.model, params["critic"], rows) if self.with_critic else jnp.zeros_like(logp)
        return logp, ref_logp, values, entropy

    def make_rollout(self, loop, examples, seed: int):
        t0 = time.perf_counter()
        p, eos = self.ppo, self.tokenizer.eos_token_id
        prompt_tokens, lengths, prompt_ids = self.prompt_rows(examples, p.group_size)
        params = loop.host_params()
        responses = self.sample(params, prompt_tokens, lengths, seed)
        rows, has_eos, n_resp = self.sequences(prompt_tokens, lengths, responses)
        logp, ref_logp, values, entropy = self._score(params, loop.frozen, {k: jnp.asarray(v) for k, v in rows.items()})
        t_sample = time.perf_counter() - t0

        texts = [decode(self.tokenizer, [t for t in resp[:n] if t != eos]) for resp, n in zip(responses, n_resp)]
        prompts = [decode(self.tokenizer, x) for x in prompt_ids]
        repeated = [ex for ex in examples for _ in range(p.group_size)]
        raw = np.asarray(self.reward_fn(prompts, texts, repeated), np.float32)
        if raw.shape != (self.rows,):
            raise ValueError(f"ppo.reward_fn={p.reward_fn!r} returned {raw.shape[0] if raw.ndim else raw} "
                             f"rewards for {self.rows} responses")
        score = raw + np.where(has_eos, 0.0, p.eos_penalty).astype(np.float32)

        mask = jnp.asarray(rows["mask"])
        k1 = rl.kl_estimate(logp, ref_logp, "k1") * mask
        beta = self.kl_ctl.beta
        zero_groups = 0
        if self.with_critic:
            kl = rl.kl_estimate(logp, ref_logp, p.kl_estimator)
            rewards = rl.token_rewards(jnp.asarray(score), kl, mask, beta)
            advantages, returns = rl.gae(rewards, values, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = rl.whiten(advantages, mask)
        else:
            adv, zero_groups = rl.grpo_advantages(jnp.asarray(score), p.group_size)
            advantages, returns = adv[:, None] * mask, jnp.zeros_like(mask)
        arrays = dict(rows, old_logp=logp, ref_logp=ref_logp, advantages=advantages, old_values=values * mask,
                      returns=returns, beta=jnp.full((self.rows,), beta, jnp.float32))
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        stats = {
            "reward_mean": float(raw.mean()), "reward_std": float(raw.std()), "score_mean": float(score.mean()),
            "kl_per_response": float(jnp.sum(k1) / self.rows),
            "entropy": float(jnp.sum(entropy * mask) / jnp.sum(mask)),
            "response_length": float(n_resp.mean()), "eos_penalty_rate": float(1.0 - has_eos.mean()),
            "zero_adv_groups": int(zero_groups), "rollout_time_s": time.perf_counter() - t0, "sample_time_s": t_sample,
        }
        if self.with_critic:
            stats["explained_variance"] = float(1.0 - rl.masked_var(returns - values, mask) /
                                                jnp.maximum(rl.masked_var(returns, mask), 1e-8))
        return arrays, stats

    # --- the loss -------------------------------------------------------------------------------
    def loss(self, params, frozen, batch):
        p, mask = self.ppo, batch["mask"]
        logp, entropy = actor_logps(self.model, params["params"], batch)
        pg, clipped, ratio = rl.policy_loss(logp, batch["old_logp"], batch["advantages"], mask, p.clip)
        ratio_dev = rl.masked_sum(jnp.abs(jnp.exp(logp - batch["old_logp"]) - 1.0), mask)
        kl_tokens = rl.kl_estimate(logp, batch["ref_logp"], "k1")
        total, vf, vclipped = pg, jnp.zeros(()), jnp.zeros(())
        if self.with_critic:
            values = critic_values(self.model, params["critic"], batch)
            vf, vclipped = rl.value_loss(values, batch["old_values"], batch["returns"], mask, p.value_clip)
            total = pg + p.value_coef * vf
        else:  # GRPO: KL to the reference in the loss (k3, as DeepSeekMath), weighted by beta
            k3 = rl.kl_estimate(logp, batch["ref_logp"], "k3")
            total = pg + rl.masked_sum(batch["beta"][:, None] * k3, mask)
        return total, {"pg_loss": pg, "value_loss": vf, "clipfrac": clipped, "value_clipfrac": vclipped,
                       "ratio": ratio, "ratio_dev": ratio_dev, "entropy": rl.masked_sum(entropy, mask),
                       "kl": rl.masked_sum(kl_tokens, mask)}

    def normalizer(self, batch):
        return jnp.maximum(jnp.sum(batch["mask"]), 1.0)

    def batch_metrics(self, batch):
        return {"supervised_tokens": jnp.sum(batch["mask"]), "tokens": jnp.sum(batch["segment_ids"] > 0)}

    def eval_sums(self, params, frozen, batch):
        return self.loss(params, frozen, batch)[0], self.normalizer(batch)

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, loop, step):
        """Greedy exact match on held-out prompts (SFT's), and the mean per-response KL
        (sum of k1 over response tokens) of ``ppo.eval_kl_prompts`` held-out prompts sampled
        at temperature 1, plus their reward."""
        results = self.generation_eval(loop, step)
        examples = (loop.eval_data.examples or [])[:self.ppo.eval_kl_prompts] if loop.eval_data is not None else []
        if examples:
            prompt_tokens, lengths, prompt_ids = self.prompt_rows(examples, 1)
            params = loop.host_params()
            responses = self.sample(params, prompt_tokens, lengths, seed=self.config.train.seed + 7919)
            rows, has_eos, n_resp = self.sequences(prompt_tokens, lengths, responses)
            logp, ref_logp, _, _ = self._score(params, loop.frozen, {k: jnp.asarray(v) for k, v in rows.items()})
            results["eval_kl_per_response"] = float(jnp.sum((logp - ref_logp) * rows["mask"]) / len(examples))
            eos = self.tokenizer.eos_token_id
            texts = [decode(self.tokenizer, [t for t in r[:n] if t != eos]) for r, n in zip(responses, n_resp)]
            prompts = [decode(self.tokenizer, x) for x in prompt_ids]
            results["eval_sampled_reward"] = float(np.mean(self.reward_fn(prompts, texts, examples)))
        return results
