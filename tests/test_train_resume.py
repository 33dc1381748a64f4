"""Exact resume through the real command line: SIGKILL after a committed checkpoint, SIGKILL
in the middle of a save, and SIGTERM, each followed by the same command again.

Equality is bit-for-bit: on CPU the same compiled program on the same restored bytes and
the same batches (the iterator is a pure function of the step) is deterministic."""

from __future__ import annotations

import functools
import time

import jax
import pytest

from sft_jax.core import checkpoint as ckpt
from train_fixtures import assert_trees_equal, logged_steps, losses, train_cli, write_tiny_yaml

STEPS = 8
EVERY = 2
LONG = 120  # the SIGTERM run: long enough that the signal lands mid-run, not after the last step

# One CPU device, as a user runs it: the persistent compilation cache (whose hit on resume
# is checked below) is off with several CPU devices (see core.setup.enable_compilation_cache).
# Resuming onto other meshes is tests/test_train_mesh.py's and tests/test_multiprocess.py's.
train_cli = functools.partial(train_cli, devices=None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cache = root / "xla_cache"

    def config(name, *extra):
        return write_tiny_yaml(root / f"{name}.yaml", root / name, f"train.steps={STEPS}",
                               f"checkpoint.every={EVERY}", "checkpoint.keep=10", *extra, cache_dir=cache)

    straight = config("straight")
    done = train_cli(["--config", straight])
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(cache.glob("jit_step-*")), "train.compilation_cache was not written"
    return root, config, final_state(root / "straight")


def final_state(run_dir, steps=STEPS):
    out = ckpt.restore(run_dir / "checkpoints", step=steps, with_opt_state=True)
    return losses(run_dir)[steps], jax.device_get(out["params"]), jax.device_get(out["opt_state"])


def assert_same_as_uninterrupted(run_dir, reference, steps=STEPS):
    loss, params, opt_state = final_state(run_dir, steps)
    assert loss == reference[0]
    assert_trees_equal((params, opt_state), reference[1:])
    # every step logged once, none twice, in order (the resumed run dropped what came after its checkpoint)
    assert logged_steps(run_dir) == list(range(1, steps + 1))


def test_sigkill_after_committed_checkpoint_then_rerun(setup):
    root, config, reference = setup
    cfg = config("killed")
    first = train_cli(["--config", cfg], env_extra={"SFT_JAX_FAULT": "step:4:after_save"})
    assert first.returncode == -9
    assert ckpt.latest_step(root / "killed" / "checkpoints") == 4
    second = train_cli(["--config", cfg], env_extra={"JAX_LOG_COMPILES": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    assert_same_as_uninterrupted(root / "killed", reference)
    # the resumed process loads the train step from the persistent cache instead of compiling it
    assert "Persistent compilation cache hit for 'jit_step'" in second.stderr, second.stderr[-3000:]


def test_sigkill_during_save_is_ignored_at_resume(setup):
    root, config, reference = setup
    cfg = config("torn")
    first = train_cli(["--config", cfg], env_extra={"SFT_JAX_FAULT": "step:4:during_save"})
    assert first.returncode == -9
    ckpts = root / "torn" / "checkpoints"
    # the kill did land inside step 4's save: its temporary directory is on disk, uncommitted
    assert [p.name.split(".")[0] for p in ckpts.glob("*.orbax-checkpoint-tmp*")] == ["4"], list(ckpts.iterdir())
    assert ckpt.latest_step(ckpts) == 2  # step 4's write never finished, so it does not count
    second = train_cli(["--config", cfg])
    assert second.returncode == 0, second.stdout + second.stderr
    assert_same_as_uninterrupted(root / "torn", reference)


def test_sigterm_saves_the_current_step_and_exits_0_then_the_rerun_ends_as_uninterrupted(setup):
    root, config, _ = setup
    long = (f"train.steps={LONG}", "checkpoint.every=1000")  # no periodic save: SIGTERM's is the only one
    reference = config("straight_long", *long)
    done = train_cli(["--config", reference])
    assert done.returncode == 0, done.stdout + done.stderr
    cfg = config("preempted", *long)
    proc = train_cli(["--config", cfg], background=True)
    deadline = time.monotonic() + 600  # generous: a loaded machine is slow, a hang still ends
    while time.monotonic() < deadline and proc.poll() is None:
        if any(s >= 3 for s in logged_steps(root / "preempted")):  # tolerant: the file is being appended
            break
        time.sleep(0.01)
    proc.terminate()  # SIGTERM
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    step = ckpt.latest_step(root / "preempted" / "checkpoints")
    assert step is not None and 3 <= step < LONG, output
    saved = ckpt.restore(root / "preempted" / "checkpoints")
    assert saved["train_state"]["step"] == step and saved["train_state"]["data"]["step"] == step
    assert f"saved step {step}" in output
    # the same command again ends where the uninterrupted run did
    second = train_cli(["--config", cfg])
    assert second.returncode == 0, second.stdout + second.stderr
    assert_same_as_uninterrupted(root / "preempted", final_state(root / "straight_long", LONG), LONG)
