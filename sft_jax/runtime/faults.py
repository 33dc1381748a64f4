"""Fault injection for the crash, preemption and lock tests: one switch, ``SFT_JAX_FAULT``.
Unset (always, outside tests) it does nothing.

    SFT_JAX_FAULT=step:4:after_save    SIGKILL the run once step 4's checkpoint is committed
    SFT_JAX_FAULT=step:4:during_save   SIGKILL it while step 4's checkpoint is being written
    SFT_JAX_FAULT=step:4:sigterm       send it SIGTERM after step 4, saved or not (a preemption
                                       notice at a known step; the loop saves and exits 0)
    SFT_JAX_FAULT=cache:kill           SIGKILL the data-cache builder after it wrote the arrays,
                                       before it renames them into place
    SFT_JAX_FAULT=cache:sleep:2.5      sleep 2.5 s before building the data cache (lock contention)
    SFT_JAX_FAULT=precompute:3         SIGKILL DPO once 3 batches of its reference log-probs
                                       (dpo.precompute_reference) are computed, before any is stored;
                                       with several processes, each one that has it set
"""

from __future__ import annotations

import os
import signal
import time

ENV = "SFT_JAX_FAULT"


def _fault(where: str) -> str | None:
    """The rest of the switch's value when it names ``where``, else None."""
    kind, _, rest = os.environ.get(ENV, "").partition(":")
    return rest if kind == where else None


def after_step(step: int, saved: bool, checkpoint_dir, wait_until_saved) -> None:
    """The ``step:N:PHASE`` fault, called by the training loop after every step."""
    spec = _fault("step")
    if spec is None:
        return
    at, _, phase = spec.partition(":")
    if step != int(at) or not (saved or phase == "sigterm"):
        return
    if phase == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if phase == "after_save":
        wait_until_saved()
    elif phase == "during_save":  # orbax makes the step's temporary directory in the background
        deadline = time.monotonic() + 60
        while not any(checkpoint_dir.glob(f"{step}.orbax-checkpoint-tmp*")) and time.monotonic() < deadline:
            time.sleep(0.001)
    else:
        raise ValueError(f"{ENV}=step:{spec}: the phase is after_save, during_save or sigterm")
    os.kill(os.getpid(), signal.SIGKILL)


def before_cache_build() -> None:
    """The ``cache:sleep:SECONDS`` fault."""
    spec = _fault("cache")
    if spec and spec.startswith("sleep:"):
        time.sleep(float(spec.split(":", 1)[1]))


def after_cache_write() -> None:
    """The ``cache:kill`` fault: the arrays are written, nothing is renamed."""
    if _fault("cache") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def after_reference_batch(done: int) -> None:
    """The ``precompute:N`` fault, called after each batch of DPO's reference pass."""
    spec = _fault("precompute")
    if spec is not None and done == int(spec):
        os.kill(os.getpid(), signal.SIGKILL)
