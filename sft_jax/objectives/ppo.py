"""PPO with a per-token KL penalty to the SFT model (InstructGPT), and GRPO, on the training core.

One *rollout* every ``updates_per_rollout`` optimizer steps (the core's ``rollout`` hook):

1. ``ppo.rollout_prompts`` training prompts, each ``ppo.group_size`` times, left-padded to
   ``ppo.prompt_length``; responses sampled from pi at temperature 1 by the jitted KV-cache
   sampler (``sft_jax.inference.sampling``), all rows in one call, no host round trip per token.
2. One batched pass gives the old log-probs (pi), reference log-probs (the frozen SFT
   model) and the critic's values of every response token.
3. The reward: a function ``module:function(prompts, responses, examples)`` on the decoded
   answers, or a reward model (``ppo.reward_model``, frozen on the mesh, read at each
   answer's last token that is not EOS, as transformers' *ForSequenceClassification
   reads it), optionally normalised by a running mean and std (``ppo.reward_norm``);
   answers without EOS get ``ppo.eos_penalty`` added.
4. PPO: per-token reward = score at the last response token - beta * KL at every response
   token, GAE, whitened advantages. GRPO: group-relative advantages, no critic; the KL
   (k3) to the reference goes into the loss instead.

Sampling and the batched passes run on the run's mesh, rows split over its batch axes
(data x fsdp) on every process; every process then holds the whole rollout and trains on
its rows of each mini-batch.

The rollout is then trained on for ``ppo.epochs`` passes of shuffled mini-batches of
``train.global_batch_size`` rows, one mini-batch per optimizer step. Trainable parameters
are one tree, ``{"params": actor, "critic": {"trunk": a second model, "head": value head}}`` (PPO)
or ``{"params": actor}`` (GRPO), so the core's checkpointing, resume and optimizer hold
both; the loss is the actor's plus ``ppo.value_coef`` times the critic's, and the
critic's updates are scaled to its own learning rate (``ppo.critic_lr``). Under ``model.lora``
the actor (and with ``ppo.critic=adapters`` the critic's trunk) are adapters on one frozen base,
which is also the reference.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.core import mesh as shd
from sft_jax.config import DEFAULT_REWARD_FN, ConfigError
from sft_jax.data import encode_prompt
from sft_jax.data.formats import decode
from sft_jax.data.run import run_datasets
from sft_jax.models.family import family_of, stop_token_ids
from sft_jax.models.heads import reward_read_position
from sft_jax.models.layers.common import scores_at
from sft_jax.objectives import rl_losses as rl
from sft_jax.objectives import sft
from sft_jax.objectives.base import Data
from sft_jax.inference.sampling import _decode
from sft_jax.runtime import distributed
from sft_jax.runtime.paths import run_dirs

ROW_KEYS = ("tokens", "positions", "segment_ids", "targets", "mask", "old_logp", "ref_logp", "advantages",
            "old_values", "returns", "beta", "reward", "score")
ROW_ONLY = ("beta", "reward", "score")  # one number per row; the others are (rows, length)
ROLLOUT_DIR = "rollout"  # the current rollout's arrays, for a resume between its updates
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


def reward_model_dir(spec: str, model_cfg, tokenizer, length: int, critic_from_it: bool):
    """The reward-model directory ``ppo.reward_model`` names (a ``*ForSequenceClassification``
    export, or a reward run whose ``hf/`` holds one) and its config, checked against the actor:
    the same family, tokenizer and chat template (it scores the actor's tokens as they are),
    room for ``length`` positions, and the actor's architecture if the critic starts from it."""
    from sft_jax.models import hf_io as hf
    from sft_jax.objectives.reward import is_reward_dir
    from sft_jax.models.tokenizer import load_tokenizer

    where = f"ppo.reward_model={spec!r}"
    directory = Path(spec).expanduser()
    if not is_reward_dir(directory) and is_reward_dir(directory / "hf"):
        directory = directory / "hf"
    if not is_reward_dir(directory):
        raise ConfigError(f"{where}: not a reward model directory (an HF *ForSequenceClassification export, "
                          f"e.g. python -m sft_jax.reward's OUTPUT_DIR/hf)")
    try:
        cfg = hf.read_config(directory, dtype=model_cfg.dtype, attention=model_cfg.attention,
                             scan_layers=model_cfg.scan_layers)
    except hf.HFFormatError as e:
        raise ConfigError(f"{where}: {e}") from None
    family = family_of(model_cfg)
    if family_of(cfg) is not family:
        raise ConfigError(f"{where}: a {family_of(cfg).name} model; the policy is {family.name} (the reward model "
                          f"must be of the policy's family)")
    theirs = load_tokenizer(str(directory))
    if theirs.get_vocab() != tokenizer.get_vocab() or cfg.eos_token_id != model_cfg.eos_token_id:
        raise ConfigError(f"{where}: its tokenizer differs from the policy's (it would score other tokens)")
    if (theirs.chat_template or None) != (tokenizer.chat_template or None):
        raise ConfigError(f"{where}: it was trained with another chat template than this run's data.template; "
                          f"it would score prompts laid out differently")
    if cfg.max_position_embeddings < length:
        raise ConfigError(f"{where}: {cfg.max_position_embeddings} positions < ppo.prompt_length + "
                          f"ppo.max_new_tokens = {length}")
    arch = family.arch_fields
    if critic_from_it and any(getattr(cfg, k) != getattr(model_cfg, k) for k in arch):
        raise ConfigError(f"ppo.critic_init=reward: the reward model's architecture "
                          f"{ {k: getattr(cfg, k) for k in arch} } is not the actor's "
                          f"{ {k: getattr(model_cfg, k) for k in arch} }")
    return directory, cfg


def actor_logps(model, actor, batch) -> tuple[jax.Array, jax.Array]:
    """(log pi(target_t | prefix), entropy at t), each (B,T) float32; ``model`` is a family's module."""
    hidden = model.apply({"params": actor}, batch["tokens"], batch["positions"], batch["segment_ids"],
                         return_hidden=True)
    logits = family_of(model.config).logits(actor, hidden, model.config)  # (B,T,V)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return picked - logz, rl.entropy_from_logits(logits)


def critic_values(model, critic, batch) -> jax.Array:
    """The critic's value at each position, (B,T) float32: a linear head on a trunk of the actor's family."""
    hidden = model.apply({"params": critic["trunk"]}, batch["tokens"], batch["positions"], batch["segment_ids"],
                         return_hidden=True)
    return jnp.einsum("BTD,D->BT", hidden.astype(jnp.float32), critic["head"]["kernel"]) + critic["head"]["bias"][0]


class RolloutIterator:
    """The core's iterator: step n belongs to rollout n // updates_per_rollout, whose prompts
    are the next ``prompts_per_rollout`` of a per-epoch permutation. Its state (saved in
    every checkpoint) is the step, the KL controller's beta and the reward normaliser's
    running moments."""

    def __init__(self, n_prompts: int, prompts_per_rollout: int, updates_per_rollout: int, seed: int, kl_ctl,
                 moments=None):
        self.n, self.per, self.updates = n_prompts, prompts_per_rollout, updates_per_rollout
        self.seed, self.kl_ctl, self.moments = seed, kl_ctl, moments
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
        state = {"step": self.step, "beta": self.kl_ctl.beta}
        if self.moments is not None:
            state["reward_moments"] = self.moments.state()
        return state

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])
        self.kl_ctl.beta = float(state.get("beta", self.kl_ctl.beta))
        if self.moments is not None and "reward_moments" in state:
            self.moments.restore(state["reward_moments"])

    def close(self) -> None:
        pass


class PPOObjective(sft.SFTObjective):
    """PPO (``ppo.advantage=gae``) or GRPO (``ppo.advantage=grpo``); SFT's held-out exact
    match and export, on the actor. Under LoRA the actor is adapters on the frozen base, the
    reference is that base with the adapters off, and the critic (``ppo.critic``) either adapters
    of its own plus the value head on the same base, or a whole trunk as without LoRA."""
    supports_lora = True
    frozen_is_start = True  # the reference is the starting actor (beside the reward model)

    def __init__(self, config, model_cfg, tokenizer, hf_dir=None):
        super().__init__(config, model_cfg, tokenizer, hf_dir)
        p = self.ppo = config.ppo
        self.with_critic = p.advantage == "gae"
        self.critic_on_base = self.with_critic and config.model.uses_lora() and p.critic == "adapters"
        self.rows = p.rollout_prompts * p.group_size
        if self.rows % config.train.global_batch_size:  # checked here, not in config: SFT configs need not fit it
            raise ConfigError(f"ppo.rollout_prompts x ppo.group_size = {self.rows} rows per rollout is not a "
                              f"multiple of train.global_batch_size={config.train.global_batch_size}")
        self.mini_batches = self.rows // config.train.global_batch_size
        self.updates_per_rollout = p.epochs * self.mini_batches
        self.length = p.prompt_length + p.max_new_tokens
        if self.length > model_cfg.max_position_embeddings:
            raise ConfigError(f"ppo.prompt_length + ppo.max_new_tokens = {self.length} exceeds the model's "
                              f"{model_cfg.max_position_embeddings} positions")
        self.reward_dir = self.reward_cfg = None
        if p.reward_model is not None:
            self.reward_fn, self.reward_name = None, p.reward_model
            self.reward_dir, self.reward_cfg = reward_model_dir(p.reward_model, model_cfg, tokenizer, self.length,
                                                                p.critic_init == "reward")
        else:
            self.reward_name = p.reward_fn or DEFAULT_REWARD_FN
            self.reward_fn = load_reward_fn(self.reward_name)
        self.moments = rl.RunningMoments() if p.reward_norm else None
        self.kl_ctl = (rl.FixedKLController(p.kl_coef) if p.kl_target is None else
                       rl.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon))
        self.batch_axes = {k: ("batch",) if k in ROW_ONLY else ("batch", "length") for k in ROW_KEYS}
        self.metric_names = ("pg_loss", "value_loss", "clipfrac", "value_clipfrac", "ratio", "ratio_dev",
                             "entropy", "kl")
        self.cache = None  # (rollout index, arrays of the whole rollout, per-epoch row orders)
        self._score = jax.jit(self._score_rows)
        self._sample = jax.jit(self._sample_rows, static_argnames="greedy")
        self._advantages = jax.jit(self._advantage_rows)

    # --- parameters ---------------------------------------------------------------------------
    def abstract_params(self):
        actor = family_of(self.model_cfg).param_shapes(self.model_cfg)
        if not self.with_critic:
            return actor
        D = self.model_cfg.hidden_size
        box = lambda shape, names: nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names=names)
        head = {"kernel": box((D,), ("embed",)), "bias": box((1,), (None,))}
        return {"params": actor["params"], "critic": {"trunk": actor["params"], "head": head}}

    def _with_critic(self, actor, trunk, head=None):
        if not self.with_critic:
            return {"params": actor}
        if head is None:
            D = self.model_cfg.hidden_size
            head = {"kernel": jnp.zeros((D,), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}
        return {"params": actor, "critic": {"trunk": trunk, "head": head}}

    def lora_trunks(self):
        return (("params",), ("critic", "trunk")) if self.critic_on_base else (("params",),)

    def init_params(self, key):
        actor = sft.init_params(self.model_cfg, key)["params"]
        trunk = actor if self.ppo.critic_init == "actor" else sft.init_params(
            self.model_cfg, jax.random.fold_in(key, 1))["params"]
        return self._with_critic(actor, trunk)

    def initial_params(self, shardings):
        """The actor from ``model.init_from``; the critic's trunk a second copy of it, the
        reward model's trunk and head (``ppo.critic_init=reward``), or drawn from the seed."""
        from_reward = self.with_critic and self.ppo.critic_init == "reward"
        if self.hf_dir is None and not from_reward:
            return None
        from sft_jax.models import hf_io

        seed = jax.random.key(self.config.train.seed)
        load = lambda sh: hf_io.load_hf(self.hf_dir, shardings={"params": sh}, dtype=self.model_cfg.dtype)[1]["params"]
        draw = lambda sh, key: jax.jit(lambda k: sft.init_params(self.model_cfg, k)["params"], out_shardings=sh)(key)
        actor = load(shardings["params"]) if self.hf_dir is not None else draw(shardings["params"], seed)
        if not self.with_critic:
            return {"params": actor}
        head = None
        if from_reward:
            from sft_jax.models.hf_reward import load_reward_hf

            _, trunk, reward_head = load_reward_hf(self.reward_dir, shardings={"params": shardings["critic"]["trunk"]},
                                                   dtype=self.model_cfg.dtype)
            trunk = trunk["params"]
            head = {"kernel": reward_head["score"]["kernel"][:, 0], "bias": jnp.zeros((1,), jnp.float32)}
        elif self.critic_on_base:
            trunk = None  # the critic's adapters sit on the frozen base: no trunk of its own to load
        elif self.ppo.critic_init == "actor":
            trunk = load(shardings["critic"]["trunk"]) if self.hf_dir is not None else draw(
                shardings["critic"]["trunk"], seed)
        else:
            trunk = draw(shardings["critic"]["trunk"], jax.random.fold_in(seed, 1))
        params = self._with_critic(actor, trunk, head)
        params["critic"]["head"] = jax.device_put(params["critic"]["head"], shardings["critic"]["head"])
        return params

    def optimizer(self, tx):
        """The config's chain; with ``ppo.critic_lr`` the critic's updates scaled to its own rate."""
        lr, critic_lr = self.config.optim.lr, self.ppo.critic_lr
        if not self.with_critic or critic_lr is None or critic_lr == lr:
            return tx
        if lr == 0:
            raise ConfigError(f"ppo.critic_lr={critic_lr} with optim.lr=0: the critic's rate is set relative to "
                              f"optim.lr's schedule; give optim.lr > 0")
        import optax

        return optax.chain(tx, rl.scale_subtree("critic", critic_lr / lr))

    def frozen_params(self, mesh):
        """The reference model (the starting actor, rebuilt from its source on every start)
        and, with ``ppo.reward_model``, the reward model, both on the mesh."""
        shardings = shd.logical_shardings(mesh, family_of(self.model_cfg).param_shapes(self.model_cfg))
        if self.hf_dir is not None:
            from sft_jax.models import hf_io

            params = hf_io.load_hf(self.hf_dir, shardings=shardings, dtype=self.model_cfg.dtype)[1]
        else:
            params = jax.jit(lambda k: {"params": sft.init_params(self.model_cfg, k)["params"]},
                             out_shardings=shardings)(jax.random.key(self.config.train.seed))
        besides = self.frozen_besides_start(mesh)
        if besides is None:
            return params, shardings
        return {**params, **besides[0]}, {**shardings, **besides[1]}

    def frozen_besides_start(self, mesh):
        """The reward model (``ppo.reward_model``) on the mesh, or None."""
        if self.reward_dir is None:
            return None
        from sft_jax.models.hf_reward import load_reward_hf

        reward_sh = shd.logical_shardings(mesh, family_of(self.reward_cfg).param_shapes(self.reward_cfg))
        head_sh = {"score": {"kernel": shd.replicated(mesh)}}
        _, trunk, head = load_reward_hf(self.reward_dir, shardings=reward_sh, dtype=self.model_cfg.dtype)
        frozen = {"reward": {"params": trunk["params"], "head": jax.device_put(head, head_sh)}}
        return frozen, {"reward": {"params": reward_sh["params"], "head": head_sh}}

    def decoding_params(self, loop):
        return {"params": loop.host_params()["params"]}

    # --- data ---------------------------------------------------------------------------------
    def build_data(self) -> Data:
        c = self.config
        train_ds, eval_ds, report = run_datasets(c, self.tokenizer, self.model_cfg, pairs=False)
        self.train_examples = train_ds.examples
        if len(self.train_examples) < self.ppo.rollout_prompts:
            raise ConfigError(f"ppo.rollout_prompts={self.ppo.rollout_prompts} exceeds the "
                              f"{len(self.train_examples)} training prompts")
        iterator = RolloutIterator(len(self.train_examples), self.ppo.rollout_prompts, self.updates_per_rollout,
                                   c.train.seed, self.kl_ctl, self.moments)
        return Data(iterator, eval_ds, report.to_markdown())

    # --- the rollout hook -----------------------------------------------------------------------
    def rollout(self, loop, step, batch):
        r, j = batch["rollout"], batch["update"]
        if self.cache is None or self.cache[0] != r:
            # resumed in the middle of rollout r's updates (a SIGTERM between checkpoints): its
            # arrays as sampled, from the run directory; beta and the reward moments came back
            # with the checkpoint, already updated by it
            arrays = self.stored_rollout(r) if j else None
            if arrays is None:
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

    def on_save(self, loop, step: int) -> None:
        """A checkpoint between a rollout's updates (a SIGTERM's): keep that rollout beside it."""
        if step % self.updates_per_rollout and self.cache is not None:
            self.store_rollout(*self.cache[:2])

    def rollout_file(self) -> Path:
        """This process's copy of the current rollout, in the run's local directory (a gs:// run's
        staging directory)."""
        return run_dirs(self.config)[0] / ROLLOUT_DIR / f"process_{jax.process_index()}.npz"

    def rollout_key(self) -> str:
        """What a rollout's arrays depend on besides the parameters: a stored one made under other
        settings is not reused."""
        c = self.config
        made_by = (c.ppo, c.train.seed, c.train.global_batch_size, c.model.init_from)
        return hashlib.sha1(repr(made_by).encode()).hexdigest()

    def store_rollout(self, r: int, arrays: dict) -> None:
        """Rollout r's arrays (every process holds all of them), for a rerun from a checkpoint in it."""
        path = self.rollout_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, rollout=np.int64(r), made_by=np.bytes_(self.rollout_key()), **arrays)
        tmp.replace(path)

    def stored_rollout(self, r: int) -> dict | None:
        """Rollout r's arrays if every process still has them, else None (each samples it again)."""
        path = self.rollout_file()
        arrays = None
        if path.is_file():
            with np.load(path) as stored:
                if (set(stored.files) == {"rollout", "made_by", *ROW_KEYS} and int(stored["rollout"]) == r
                        and stored["made_by"].item() == self.rollout_key().encode()):
                    arrays = {k: stored[k] for k in ROW_KEYS}
        return arrays if distributed.on_every_process(arrays is not None) else None

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

    # --- sampling and the batched passes, on the mesh ----------------------------------------------
    def stops(self) -> tuple[int, ...]:
        """Ids that end a response: the tokenizer's EOS and every end-of-turn id the model lists."""
        return tuple(dict.fromkeys((self.tokenizer.eos_token_id, *stop_token_ids(self.model_cfg))))

    def _sample_rows(self, actor, tokens, lengths, key, greedy: bool):
        out = _decode({"params": actor}, tokens, lengths, key, jnp.float32(1.0), jnp.float32(NO_NUCLEUS),
                      jnp.int32(self.tokenizer.eos_token_id), cfg=self.model_cfg,
                      max_new_tokens=self.ppo.max_new_tokens, greedy=greedy, top_k=0,
                      stop_ids=jnp.asarray(self.stops(), jnp.int32))
        return jax.lax.with_sharding_constraint(out, shd.BATCH_SPEC)

    def sample(self, loop, prompt_tokens, lengths, seed: int, greedy: bool = False) -> np.ndarray:
        """Responses (R, max_new_tokens) sampled from the current actor at temperature 1 (or
        greedy), rows split over the mesh's batch axes; every process gets them all."""
        rows = len(prompt_tokens)
        tokens, lengths = on_mesh(loop.mesh, prompt_tokens, lengths)
        with shd.rules_context(loop.mesh):
            out = self._sample(loop.state.params["params"], tokens, lengths, jax.random.key(seed), greedy=greedy)
        return to_host(out)[:rows]

    def sequences(self, prompt_tokens, lengths, responses):
        """The (R, L) arrays of prompt + response that the batched passes and the loss read.

        Position t predicts ``targets[t]`` = token t+1; ``mask[t]`` is 1 where that target
        is a response token (up to and including its EOS)."""
        eos = self.tokenizer.eos_token_id
        R, P = prompt_tokens.shape
        N = responses.shape[1]
        is_eos = np.isin(responses, self.stops())  # the response ends at any end-of-turn id
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

    def _score_rows(self, params, frozen, rows, reward_index):
        """One batched pass: old and reference log-probs, values, entropy, and the reward
        model's score at ``reward_index`` (zeros without a reward model)."""
        logp, entropy = actor_logps(self.model, params["params"], rows)
        ref_logp, _ = actor_logps(self.model, frozen["params"], rows)
        values = critic_values(self.model, params["critic"], rows) if self.with_critic else jnp.zeros_like(logp)
        reward = jnp.zeros(logp.shape[:1], jnp.float32)
        if self.reward_cfg is not None:
            reward_model = family_of(self.reward_cfg).module(self.reward_cfg)
            hidden = reward_model.apply({"params": frozen["reward"]["params"]}, rows["tokens"],
                                        rows["positions"], rows["segment_ids"], return_hidden=True)
            reward = scores_at(frozen["reward"]["head"], hidden, reward_index[:, None])[:, 0]
        constrain = lambda x: jax.lax.with_sharding_constraint(x, shd.BATCH_SPEC)  # noqa: E731
        return tuple(map(constrain, (logp, ref_logp, values, entropy, reward)))

    def score(self, loop, rows: dict, n_resp: np.ndarray, has_eos: np.ndarray):
        """(logp, ref_logp, values, entropy, reward model scores) of the rows, as host arrays.
        The reward model reads each answer's last token that is not EOS (the last prompt
        token for an empty answer), the position transformers' *ForSequenceClassification
        reads in prompt + answer + EOS with pad = EOS."""
        index = reward_read_position(self.ppo.prompt_length, n_resp, has_eos).astype(np.int32)
        n = len(index)
        keys = ("tokens", "positions", "segment_ids", "targets")
        placed = on_mesh(loop.mesh, *(rows[k] for k in keys), index)
        with shd.rules_context(loop.mesh):
            out = self._score(loop.state.params, loop.frozen, dict(zip(keys, placed[:-1])), placed[-1])
        return tuple(to_host(x)[:n] for x in out)

    def rewards(self, prompts, texts, examples, model_scores) -> np.ndarray:
        raw = (np.asarray(self.reward_fn(prompts, texts, examples), np.float32) if self.reward_fn is not None
               else np.asarray(model_scores, np.float32))
        if raw.shape != (len(texts),):
            raise ValueError(f"ppo.reward_fn={self.reward_name!r} returned {raw.shape[0] if raw.ndim else raw} "
                             f"rewards for {len(texts)} responses")
        return raw

    def make_rollout(self, loop, examples, seed: int):
        t0 = time.perf_counter()
        p = self.ppo
        prompt_tokens, lengths, prompt_ids = self.prompt_rows(examples, p.group_size)
        responses = self.sample(loop, prompt_tokens, lengths, seed)
        rows, has_eos, n_resp = self.sequences(prompt_tokens, lengths, responses)
        logp, ref_logp, values, entropy, model_scores = self.score(loop, rows, n_resp, has_eos)
        t_sample = time.perf_counter() - t0

        texts = [decode(self.tokenizer, [t for t in resp[:n] if t not in self.stops()])
                 for resp, n in zip(responses, n_resp)]
        prompts = [decode(self.tokenizer, x) for x in prompt_ids]
        repeated = [ex for ex in examples for _ in range(p.group_size)]
        raw = self.rewards(prompts, texts, repeated, model_scores)
        normalised = self.moments.normalize(raw) if self.moments is not None else raw
        score = normalised + np.where(has_eos, 0.0, p.eos_penalty).astype(np.float32)

        mask = rows["mask"]
        beta = self.kl_ctl.beta
        advantages, returns, zero_groups, explained, k1 = map(np.asarray, self._advantages(
            score, logp, ref_logp, values, mask, np.float32(beta)))
        arrays = dict(rows, old_logp=logp, ref_logp=ref_logp, advantages=advantages, old_values=values * mask,
                      returns=returns, beta=np.full((self.rows,), beta, np.float32), reward=raw, score=score)
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        stats = {
            "reward_mean": float(raw.mean()), "reward_std": float(raw.std()), "score_mean": float(score.mean()),
            "kl_per_response": float(k1 / self.rows),
            "entropy": float(np.sum(entropy * mask) / np.sum(mask)),
            "response_length": float(n_resp.mean()), "eos_penalty_rate": float(1.0 - has_eos.mean()),
            "zero_adv_groups": int(zero_groups), "rollout_time_s": time.perf_counter() - t0, "sample_time_s": t_sample,
        }
        if self.moments is not None:
            stats.update(reward_running_mean=self.moments.mean, reward_running_std=self.moments.std)
        if self.with_critic:
            stats["explained_variance"] = float(explained)
        return arrays, stats

    def _advantage_rows(self, score, logp, ref_logp, values, mask, beta):
        """(advantages, returns, zero-advantage groups, explained variance, summed k1 KL) of a
        rollout, in one program: PPO's GAE over the per-token rewards (the score at the last
        response token, -beta * KL at every one), whitened; or GRPO's group-relative advantages."""
        p = self.ppo
        k1 = jnp.sum(rl.kl_estimate(logp, ref_logp, "k1") * mask)
        if not self.with_critic:
            adv, zero_groups = rl.grpo_advantages(score, p.group_size)
            return adv[:, None] * mask, jnp.zeros_like(mask), zero_groups, jnp.zeros(()), k1
        kl = rl.kl_estimate(logp, ref_logp, p.kl_estimator)
        advantages, returns = rl.gae(rl.token_rewards(score, kl, mask, beta), values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = rl.whiten(advantages, mask)
        explained = 1.0 - rl.masked_var(returns - values, mask) / jnp.maximum(rl.masked_var(returns, mask), 1e-8)
        return advantages, returns, jnp.zeros((), jnp.int32), explained, k1

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
    def exact_match_parts(self, prompts, predictions, references) -> dict:
        """On the demo tasks (``data.format: demo``), exact match per task (``exact_match_<task>``, over
        ``exact_match_n_<task>`` prompts): the RL demo's flaw sits in two of the six."""
        if self.config.data.format != "demo":
            return {}
        from sft_jax.demos.tasks import task_of
        from sft_jax.objectives.rewards import exact_match

        tasks = [task_of(decode(self.tokenizer, ids)) for ids in prompts]
        parts = {}
        for task in sorted(set(tasks)):
            picked = [i for i, t in enumerate(tasks) if t == task]
            parts[f"exact_match_{task}"] = exact_match([predictions[i] for i in picked],
                                                       [references[i] for i in picked])
            parts[f"exact_match_n_{task}"] = len(picked)
        return parts

    def evaluate(self, loop, step):
        """Greedy exact match on held-out prompts (SFT's), and the mean per-response KL
        (sum of k1 over response tokens) of ``ppo.eval_kl_prompts`` held-out prompts sampled
        at temperature 1, plus their reward."""
        results = self.generation_eval(loop, step)
        examples = (loop.eval_data.examples or [])[:self.ppo.eval_kl_prompts] if loop.eval_data is not None else []
        if examples:
            prompt_tokens, lengths, prompt_ids = self.prompt_rows(examples, 1)
            responses = self.sample(loop, prompt_tokens, lengths, seed=self.config.train.seed + 7919)
            rows, has_eos, n_resp = self.sequences(prompt_tokens, lengths, responses)
            logp, ref_logp, _, _, model_scores = self.score(loop, rows, n_resp, has_eos)
            results["eval_kl_per_response"] = float(np.sum((logp - ref_logp) * rows["mask"]) / len(examples))
            texts = [decode(self.tokenizer, [t for t in r[:n] if t not in self.stops()]) for r, n in zip(responses, n_resp)]
            prompts = [decode(self.tokenizer, x) for x in prompt_ids]
            results["eval_sampled_reward"] = float(np.mean(self.rewards(prompts, texts, examples, model_scores)))
        return results


def on_mesh(mesh, *arrays: np.ndarray) -> list[jax.Array]:
    """Host arrays that every process holds whole -> global arrays with rows split over the
    mesh's batch axes (data x fsdp); rows are padded (repeating the first) to a multiple of
    that split, so callers keep the first ``len(array)`` rows of what comes back."""
    sharding = shd.batch_sharding(mesh)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    out = []
    for x in arrays:
        x = np.asarray(x)
        if len(x) % split:
            x = np.concatenate([x, np.repeat(x[:1], split - len(x) % split, axis=0)])
        out.append(jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]))
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one host array on every process (gathered across processes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
