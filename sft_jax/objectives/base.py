"""The interface between the core (``sft_jax.core``) and a way of training.

``Loss`` is what the jitted step traces: the batch's arrays with their logical axis names,
the loss as a pure function of (params, frozen params, micro-batch), the normaliser that
makes accumulation exact, and the per-step counts the log needs. ``Objective`` adds what
the loop asks once per run or once per evaluation: the parameters' shapes and where they
start, optional frozen parameters, the data, the evaluation and the export, and the
rollout hook PPO will use. The core owns everything else (mesh, state, optimizer,
accumulation, non-finite guard, checkpoints, resume, SIGTERM, logging, report).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional


class Data(NamedTuple):
    iterator: Any  # next() -> this process's numpy rows of a global batch; state(), restore(), close(), steps_per_epoch
    eval_data: Any  # whatever the objective's evaluate reads (None: no held-out data)
    report_md: Optional[str]  # the data report (Markdown), written to data_report.md and into report.md


class Loss:
    """What one optimizer step computes. Methods here are traced under jit: pure jnp."""

    # array name -> logical axis names ("batch" first: rows are split over data x fsdp and
    # into micro-batches along it); the step's batch holds exactly these arrays.
    batch_axes: Mapping[str, tuple[str, ...]] = {}
    # names of the aux metrics ``loss`` returns; the log records their mean over log_every steps
    metric_names: tuple[str, ...] = ()

    def loss(self, params, frozen, batch: dict):
        """(summed loss of this micro-batch, {name: summed aux metric}). The core divides
        both by ``normalizer`` of the whole global batch, so sum, never average, here."""
        raise NotImplementedError

    def normalizer(self, batch: dict):
        """What the global batch's loss is a mean over (SFT: supervised tokens; pairs for
        preference objectives), as a float32 scalar >= 1."""
        raise NotImplementedError

    def batch_metrics(self, batch: dict) -> dict:
        """Per-step counts of the global batch: at least "tokens" (non-padding tokens
        computed) and "supervised_tokens" (tokens the loss reads), for the throughput log."""
        raise NotImplementedError

    def eval_sums(self, params, frozen, batch: dict):
        """A pytree of sums over one held-out batch, added up over batches by ``evaluate``."""
        raise NotImplementedError


class Objective(Loss):
    """A way of training, built by the core once the model and tokenizer are known."""

    # True when ``frozen_params`` is the starting model (DPO's reference) or holds it under
    # "params" beside ``frozen_besides_start`` (PPO's reference beside its reward model): under
    # LoRA adapters the frozen base stands in for it, so the weights are held once.
    frozen_is_start = False
    # whether ``model.lora`` can train this objective's parameters as adapters on a frozen base
    supports_lora = False
    # what a LoRA run's adapter directory is to PEFT: CAUSAL_LM, or SEQ_CLS for a reward model
    # (whose score head is saved beside the adapters as PEFT saves ``modules_to_save``)
    lora_task = "CAUSAL_LM"

    def __init__(self, config, model_cfg, tokenizer, hf_dir=None):
        self.config, self.model_cfg, self.tokenizer, self.hf_dir = config, model_cfg, tokenizer, hf_dir

    # --- parameters -----------------------------------------------------------------------
    def abstract_params(self):
        """The trainable parameters' shapes as flax-boxed (logically named) abstract arrays."""
        raise NotImplementedError

    def init_params(self, key):
        """Fresh parameters from ``key`` (traced under jit with the state's out shardings)."""
        raise NotImplementedError

    def initial_params(self, shardings):
        """Pretrained starting parameters placed in ``shardings``, or None for ``init_params``.
        Called on a fresh start only; a resume restores the checkpoint."""
        return None

    def frozen_params(self, mesh):
        """(params, shardings) that the loss reads but never trains (e.g. DPO's reference
        model), or None. Called on a fresh start *and* on resume, so it must rebuild the
        same values both times (load them from their source, or derive them from the seed);
        they keep no optimizer state, are not checkpointed, and stay bit-equal."""
        return None

    def lora_trunks(self) -> tuple[tuple[str, ...], ...]:
        """Where copies of the starting causal LM's "params" sit in the parameter tree. Under
        LoRA each one is the frozen base plus adapters of its own (PPO's critic can be one);
        every other parameter (a score or value head) trains whole, in float32."""
        return (("params",),)

    def head_tensors(self, params) -> dict:
        """Under LoRA: the trained heads as HF tensors by their HF key (a reward model's
        ``{"score.weight": (1, D)}``), saved in the PEFT adapter directory. Default: none."""
        return {}

    def frozen_besides_start(self, mesh):
        """With ``frozen_is_start``: the frozen parameters other than the starting model, as
        (params, shardings) of a dict merged beside its "params", or None."""
        return None

    def optimizer(self, tx):
        """The optax transformation the state trains with, given the config's (``optim.*``:
        clip, AdamW, schedule). Default: as given (PPO scales the critic's updates)."""
        return tx

    def checkpoint_state(self) -> dict:
        """JSON-able entries every checkpoint's train state carries besides the loop's (what a
        resume must find unchanged, e.g. the base model under LoRA adapters). Default: none."""
        return {}

    def check_resume(self, source, train_state: dict) -> None:
        """Raise ``ConfigError`` if the checkpoint at ``source`` (its train state given) cannot
        continue this run. Default: nothing to check."""

    # --- data -------------------------------------------------------------------------------
    def build_data(self) -> Data:
        raise NotImplementedError

    # --- hooks the loop calls -----------------------------------------------------------------
    def rollout(self, loop, step: int, batch: dict) -> dict:
        """Called by the loop with each step's host batch before the update; returns the
        batch the update trains on. This is PPO's hook: sample responses from
        ``loop.state.params`` on ``loop.mesh``, score them, and return
        the arrays its loss needs. Must be deterministic in (step, parameters) for exact
        resume. Default: the batch as read."""
        return batch

    def on_save(self, loop, step: int) -> None:
        """Called on every process after the checkpoint of ``step`` is started: state the
        objective keeps outside the checkpoint goes to the run directory here. Default: none."""

    def evaluate(self, loop, step: int) -> dict:
        """Held-out metrics at ``step`` ({name: float}); samples may go to ``loop.logger``.
        ``loop.eval_fn(params, global_batch, frozen)`` runs ``eval_sums`` on the mesh."""
        return {}

    def export(self, loop, out) -> list[str]:
        """Write the trained model for other tools (every process calls this: gathering
        parameters is a collective); returns the lines to print after the run."""
        return []
