"""Reward model and DPO end to end on the training core, on the tiny config and demo pairs.

References: the frozen reference rebuilt independently (bit-equal after DPO), log 2 at the
first step (policy == reference), a one-device run (a data x fsdp x tensor mesh gives its
losses), an uninterrupted run (kill -9 and rerun ends bit-equal), and the exported reward
model scored through transformers' layout (``sft_jax.inference.scoring``), which must give the
accuracy the trainer's held-out evaluation reported."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from sft_jax.core import checkpoint as ckpt
from sft_jax.core import loop as core_loop
from sft_jax.demos.pairs import demo_pair_examples, make_pairs, write_jsonl
from sft_jax.objectives import dpo
from sft_jax.objectives.reward import RewardObjective
from sft_jax.inference.scoring import score_file
from train_fixtures import losses, metrics, tiny_config, train_cli, write_tiny_yaml

STEPS, EVERY = 4, 2
LABEL_SMOOTHING = 0.1


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Demo pairs (rejected = the task's corruption): 300 training, 48 held-out."""
    root = tmp_path_factory.mktemp("pairs")
    train, held_out = demo_pair_examples(300, 48)
    return write_jsonl(make_pairs(train), root / "train.jsonl"), write_jsonl(make_pairs(held_out), root / "eval.jsonl")


def pair_overrides(pairs, *extra):
    return (f"data.train={pairs[0]}", f"data.eval={pairs[1]}", "data.format=preference", *extra)


class RecordingDPO(dpo.DPOObjective):
    """Keeps a host copy of the reference as built, the held-out batches as evaluated, and the policy
    and reference as they are at the end."""

    eval_batches: list = []

    def eval_batch(self, batch):
        RecordingDPO.eval_batches.append(batch)
        return super().eval_batch(batch)

    def frozen_params(self, mesh):
        params, shardings = super().frozen_params(mesh)
        RecordingDPO.start = traverse_util.flatten_dict(jax.device_get(params), sep="/")
        return params, shardings

    def export(self, loop, out):
        flat = lambda tree: traverse_util.flatten_dict(jax.device_get(tree), sep="/")  # noqa: E731
        RecordingDPO.last = {"params": flat(loop.host_params()), "frozen": flat(loop.frozen)}
        return []


def test_dpo_keeps_the_reference_frozen_and_a_mesh_gives_one_device_losses(tmp_path, pairs):
    """Also: dpo.label_smoothing (0.1 here) reaches the loss: the held-out loss logged at the end is
    ``preference_losses.dpo_loss`` with that smoothing, computed here from the final policy and the
    reference on the batches the evaluation read."""
    runs = {}
    for name, devices, shape in [("one", jax.devices()[:1], "[1,1,1]"), ("mesh", jax.devices(), "[2,2,2]")]:
        cfg = tiny_config(tmp_path / name, *pair_overrides(pairs, f"train.steps={STEPS}", f"mesh.shape={shape}",
                                                           "train.micro_batch_size=4", "run.export=true",
                                                           f"dpo.kl_prompts={8 if name == 'one' else 0}",
                                                           f"dpo.label_smoothing={LABEL_SMOOTHING}"))
        RecordingDPO.eval_batches = []
        result = core_loop.run(cfg, RecordingDPO, devices=devices)
        assert result.status == "done"
        runs[name] = losses(tmp_path / name)
        if name == "one":
            start = RecordingDPO.start
            # the reference after 4 updates: bit-equal to itself before them; the policy moved off it
            assert sorted(RecordingDPO.last["frozen"]) == sorted(start)
            for key, value in start.items():
                np.testing.assert_array_equal(RecordingDPO.last["frozen"][key], value, err_msg=key)
            assert not np.array_equal(RecordingDPO.last["params"]["params/wte"], start["params/wte"])
            first = metrics(tmp_path / name)[0]
            assert first["last_loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
            assert first["chosen_logratio"] == 0.0 and first["margin"] == 0.0
            for key in ("reward_accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logratio"):
                assert all(np.isfinite(r[key]) for r in metrics(tmp_path / name)), key
            (final,) = metrics(tmp_path / name, "eval")
            assert set(final) >= {"eval_loss", "eval_reward_accuracy", "eval_sampled_kl"}
            assert final["eval_sampled_kl"] != 0.0 and np.isfinite(final["eval_sampled_kl"])
            held_out = held_out_dpo_loss(cfg, RecordingDPO.last, RecordingDPO.eval_batches)
            assert final["eval_loss"] == pytest.approx(held_out(LABEL_SMOOTHING), rel=1e-5)
            assert abs(held_out(0.0) - final["eval_loss"]) > 100 * 1e-5 * final["eval_loss"]  # the check can tell
            assert "# Preference pairs" in (tmp_path / name / "data_report.md").read_text()
    np.testing.assert_allclose([runs["mesh"][s] for s in range(1, STEPS + 1)],
                               [runs["one"][s] for s in range(1, STEPS + 1)], rtol=1e-5)


def held_out_dpo_loss(cfg, last: dict, batches: list):
    """A function of the label smoothing: the mean DPO loss with it over the held-out pairs of
    ``batches`` (the first ``train.eval_max_batches``, as the evaluation reads them), for the policy
    and reference in ``last`` (RecordingDPO's flattened trees)."""
    from sft_jax.core.setup import model_and_tokenizer
    from sft_jax.objectives.preference_losses import as_pairs, dpo_loss, sequence_logps

    model_cfg = model_and_tokenizer(cfg)[0]
    policy, reference = (traverse_util.unflatten_dict(last[k], sep="/") for k in ("params", "frozen"))
    logps = jax.jit(lambda params, batch: sequence_logps(params, batch, model_cfg))
    limit = cfg.train.eval_max_batches or len(batches)
    pairs_logps = [(as_pairs(logps(policy, b)), as_pairs(logps(reference, b)), b["pair_mask"]) for b in batches[:limit]]

    def loss(smoothing: float) -> float:
        total = pairs = 0.0
        for policy_logps, reference_logps, mask in pairs_logps:
            summed, metrics = dpo_loss(policy_logps, reference_logps, mask, beta=cfg.dpo.beta,
                                       label_smoothing=smoothing, normalizer=1.0)
            total, pairs = total + float(summed), pairs + float(metrics["pairs"])
        return total / pairs

    return loss


def test_reward_model_on_demo_pairs_mesh_parity_and_export_scores_the_same(tmp_path, pairs):
    runs = {}
    for name, devices, shape in [("one", jax.devices()[:1], "[1,1,1]"), ("mesh", jax.devices(), "[2,2,2]")]:
        cfg = tiny_config(tmp_path / name, *pair_overrides(pairs, "train.steps=3", f"mesh.shape={shape}",
                                                           "train.micro_batch_size=4", f"run.export={name == 'one'}",
                                                           "train.eval_max_batches=0"))
        assert core_loop.run(cfg, RewardObjective, devices=devices).status == "done"
        runs[name] = losses(tmp_path / name)
    np.testing.assert_allclose([runs["mesh"][s] for s in (1, 2, 3)], [runs["one"][s] for s in (1, 2, 3)], rtol=1e-5)
    (final,) = metrics(tmp_path / "one", "eval")
    print(f"reward model held-out accuracy on demo pairs: {final['eval_accuracy']:.3f}")
    assert 0.0 <= final["eval_accuracy"] <= 1.0  # reported; learning is the demo's to show (not tested here)
    # the exported GPT2ForSequenceClassification, scored through sft_jax.inference.scoring, agrees with the trainer
    lines, summary = score_file(tmp_path / "one" / "hf", str(pairs[1]))
    assert len(lines) == 48 and summary.endswith(f"{final['eval_accuracy']:.4f}")


# --- kill -9 and rerun, through the real command lines (one CPU device, as users run them) ---

cli = functools.partial(train_cli, devices=None)


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for all the runs below: a program any of them has
    compiled (the straight run's, for the killed run and its rerun; identical ones across
    commands) is loaded, not compiled again."""
    return tmp_path_factory.mktemp("xla_cache")


def final_state(run_dir):
    out = ckpt.restore(run_dir / "checkpoints", step=STEPS, with_opt_state=True)
    return losses(run_dir), jax.device_get(out["params"]), jax.device_get(out["opt_state"])


KILL_RUNS = {"dpo": ("sft_jax.dpo", ()), "dpo_precomputed": ("sft_jax.dpo", ("dpo.precompute_reference=true",)),
             "reward": ("sft_jax.reward", ())}


def kill_run_config(path, output_dir, pairs, name, cache=None):
    """The config of the kill tests' runs of ``name`` (a KILL_RUNS key), as a YAML file."""
    return write_tiny_yaml(path, output_dir, *pair_overrides(pairs, *KILL_RUNS[name][1]), f"train.steps={STEPS}",
                           f"checkpoint.every={EVERY}", "checkpoint.keep=10", "dpo.kl_prompts=0", cache_dir=cache)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, pairs):
    """``straight(name)()``: the directory of the uninterrupted one-process run of a KILL_RUNS
    config. ``straight(name)`` starts it in the background (once per module, compiling into a cache
    of its own), so it runs beside whatever the test does next; calling the result waits for it.
    The kill tests and the two-process test compare against the same runs."""
    root = tmp_path_factory.mktemp("straight")
    runs = {}

    def start(name):
        if name not in runs:
            config = kill_run_config(root / f"{name}.yaml", root / name, pairs, name, cache=root / f"{name}_cache")
            runs[name] = {"proc": cli(["--config", config], module=KILL_RUNS[name][0], background=True)}
        run = runs[name]

        def finished():
            if "output" not in run:
                run["output"], _ = run["proc"].communicate(timeout=600)
            assert run["proc"].returncode == 0, run["output"][-3000:]
            return root / name

        return finished

    yield start
    for run in runs.values():
        if run["proc"].poll() is None:
            run["proc"].kill()
            run["proc"].wait()


@pytest.mark.parametrize("name", list(KILL_RUNS))
def test_kill_9_and_rerun_ends_bit_equal(tmp_path, pairs, xla_cache, straight, name):
    module, extra = KILL_RUNS[name]
    straight_run = straight(name)  # beside the killed run and its rerun
    killed = kill_run_config(tmp_path / "killed.yaml", tmp_path / "killed", pairs, name, cache=xla_cache)
    first = cli(["--config", killed], module=module, env_extra={"SFT_JAX_FAULT": f"step:{EVERY}:after_save"})
    assert first.returncode == -9 and ckpt.latest_step(tmp_path / "killed" / "checkpoints") == EVERY
    stored = sorted((tmp_path / "killed" / dpo.REFERENCE_DIR).glob("*.npz"))
    assert len(stored) == (1 if extra else 0)
    before = [p.read_bytes() for p in stored]
    logged = metrics(tmp_path / "killed")[:EVERY]
    assert [r["step"] for r in logged] == list(range(1, EVERY + 1))
    second = cli(["--config", killed], module=module)
    assert second.returncode == 0, second.stdout + second.stderr
    straight_dir = straight_run()
    # a resume, not a restart: the records of the steps before the kill are the first run's (a
    # restart from step 0 would end with the same numbers, but log those steps again)
    assert metrics(tmp_path / "killed")[:EVERY] == logged
    assert [p.read_bytes() for p in stored] == before  # the resume reused the stored reference log-probs
    reference, resumed = final_state(straight_dir), final_state(tmp_path / "killed")
    assert resumed[0] == reference[0] and sorted(resumed[0]) == list(range(1, STEPS + 1))
    for a, b in zip(jax.tree.leaves(resumed[1:]), jax.tree.leaves(reference[1:])):
        np.testing.assert_array_equal(a, b)
    if module == "sft_jax.dpo":
        assert reference[0][1] == pytest.approx(math.log(2), rel=1e-6)


def test_processes_read_the_stored_reference_together_or_compute_it_together(tmp_path, pairs, monkeypatch):
    """Whether to read the stored reference log-probs or enter the (collective) reference pass is
    decided by all processes together: a process that finds a complete table still computes when
    a peer does not find it (another host's disk), instead of waiting for it forever. The peer is
    faked: two processes, the other one answering "not found"."""
    from types import SimpleNamespace

    from jax.experimental import multihost_utils

    from sft_jax.core.setup import model_and_tokenizer

    cfg = tiny_config(tmp_path / "run", *pair_overrides(pairs, "dpo.precompute_reference=true"))
    objective = dpo.DPOObjective(cfg, *model_and_tokenizer(cfg))
    loop = SimpleNamespace(iterator=objective.build_data().iterator)
    hashes = dpo.pair_hashes(loop.iterator.dataset)
    # a value per pair's hash (repeated pairs share one), as the reference pass gives
    stored = np.array([[int(h[:6], 16), -int(h[:6], 16)] for h in hashes], np.float32)
    objective.reference_file().parent.mkdir(parents=True)
    np.savez(objective.reference_file(), hashes=hashes, logps=stored)
    passes = []
    monkeypatch.setattr(objective, "compute_reference", lambda loop, dataset: passes.append(1) or stored + 1)
    np.testing.assert_array_equal(objective.reference_table(loop), stored)  # one process: its own table
    assert passes == []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda found: np.array([found, 0]))
    np.testing.assert_array_equal(objective.reference_table(loop), stored + 1)
    assert passes == [1]


def test_two_processes_killed_in_the_reference_pass_give_one_process_losses(tmp_path, pairs, straight):
    """``MODULE=sft_jax.dpo launch/local.sh`` with dpo.precompute_reference on 2 processes x 4 CPU
    devices, killed -9 after the first batch of the reference pass (before anything is stored),
    then run again: the losses of the one-process run of the same config (the kill test's
    uninterrupted run) to 1e-5, the same reference log-probs (1e-5) in the same file, and the same
    files in the run directory. A reward model on 2 processes writes the files and losses of its
    one-process run too."""
    from test_multiprocess import _finish, _launch

    def files(run):
        """The run directory's files; a checkpoint's down to its items (orbax lays out each item's
        arrays per process) and TensorBoard's as its folder (event files are named by time)."""
        cut = {"checkpoints": 3, "tb": 1}
        return sorted({"/".join(p.relative_to(run).parts[:cut.get(p.relative_to(run).parts[0])])
                       for p in run.rglob("*") if p.is_file()})

    def two_processes(name, out, env_extra=None, logs="logs"):
        config = kill_run_config(tmp_path / f"{out}.yaml", tmp_path / out, pairs, name)
        env = {"MODULE": KILL_RUNS[name][0], **(env_extra or {})}
        proc = _launch(tmp_path / out, tmp_path / "unused_cache", processes=2, args=("--config", str(config)),
                       logs=tmp_path / f"{out}_{logs}", env_extra=env)
        return _finish(proc, 600)

    rc, text = two_processes("dpo_precomputed", "dpo", {"SFT_JAX_FAULT": "precompute:1"}, logs="killed_logs")
    assert rc == 128 + 9, text[-3000:]  # local.sh's status: its first process ended by SIGKILL
    assert not (tmp_path / "dpo" / dpo.REFERENCE_DIR).exists() and not metrics(tmp_path / "dpo")
    rc, text = two_processes("dpo_precomputed", "dpo")
    assert rc == 0, text[-3000:]
    for name, out in (("dpo_precomputed", "dpo"), ("reward", "reward")):
        if name == "reward":
            rc, text = two_processes(name, out)
            assert rc == 0, text[-3000:]
        one, two = straight(name)(), tmp_path / out
        assert files(two) == files(one)
        assert sorted(losses(two)) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([losses(two)[s] for s in range(1, STEPS + 1)],
                                   [losses(one)[s] for s in range(1, STEPS + 1)], rtol=1e-5, err_msg=name)
    (one_file,) = (straight("dpo_precomputed")() / dpo.REFERENCE_DIR).glob("*.npz")
    with np.load(one_file) as a, np.load(tmp_path / "dpo" / dpo.REFERENCE_DIR / one_file.name) as b:
        np.testing.assert_array_equal(b["hashes"], a["hashes"])
        np.testing.assert_allclose(b["logps"], a["logps"], rtol=1e-5)


def test_bad_preference_row_stops_the_command_with_one_line(tmp_path, pairs):
    bad = tmp_path / "bad.jsonl"
    lines = pairs[0].read_text().splitlines()[:5]
    bad.write_text("\n".join(lines[:3] + ['{"prompt": "Sort the digits.", "chosen": "1 2"}'] + lines[3:]) + "\n")
    cfg = write_tiny_yaml(tmp_path / "bad.yaml", tmp_path / "run", f"data.train={bad}", "data.format=preference",
                          "train.steps=1")
    out = cli(["--config", cfg], module="sft_jax.dpo")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert str(bad) in out.stderr and " line 4" in out.stderr and "rejected" in out.stderr
    assert not (tmp_path / "run").exists()
