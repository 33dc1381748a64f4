"""Sharded training on 8 fake CPU devices: same losses as one device, the intended
shardings, one compile per run, and checkpoints that move between device counts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sft_jax.core import checkpoint as ckpt
from sft_jax.core import mesh as shd
from sft_jax.core import step as core_step
from sft_jax.objectives import sft
from sft_jax.models.gpt2 import GPT2Config
from sft_jax.core.optimizer import make_optimizer
from sft_jax.core.loop import NonFiniteError, run
from sft_jax.objectives.sft import SFTObjective
from sft_jax.core.setup import model_and_tokenizer
from train_fixtures import assert_trees_equal, logged_steps, losses, metrics, tensorboard_scalars, tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def test_intended_param_and_optimizer_shardings():
    cfg = GPT2Config.preset("tiny", vocab_size=300)
    mesh = shd.make_mesh((2, 2, 2), jax.devices())
    tx, _ = make_optimizer(tiny_config("unused").optim, 10)
    _, sh = sft.state_shardings(cfg, tx, mesh)
    p = jax.tree.map(lambda s: s.spec, sh.params)["params"]
    assert p["wte"] == P("tensor", "fsdp")  # (vocab, embed)
    assert p["wpe"] == P(None, "fsdp")  # (positions, embed)
    assert p["h"]["attn"]["c_attn_kernel"] == P(None, "fsdp", None, "tensor", None)  # (L, D, qkv, H, K)
    assert p["h"]["attn"]["c_proj_kernel"] == P(None, "tensor", None, "fsdp")  # (L, H, K, D)
    assert p["h"]["mlp"]["c_fc_kernel"] == P(None, "fsdp", "tensor")  # (L, D, F)
    assert p["h"]["mlp"]["c_proj_kernel"] == P(None, "tensor", "fsdp")  # (L, F, D)
    assert p["h"]["ln_1"]["scale"] == P(None, "fsdp")
    adam = sh.opt_state[1][0]
    for moment in (adam.mu, adam.nu):  # Adam moments follow their parameters: ZeRO-3
        assert jax.tree.map(lambda s: s.spec, moment) == jax.tree.map(lambda s: s.spec, sh.params)
    assert adam.count.spec == P()
    # a dimension the axis does not divide stays whole on it (25 heads of gpt2-xl on tensor=2)
    _, xl = sft.state_shardings(GPT2Config.preset("gpt2-xl"), tx, mesh)
    assert xl.params["params"]["h"]["attn"]["c_attn_kernel"].spec == P(None, "fsdp", None, None, None)


def test_mesh_2x2x2_matches_one_device_and_compiles_once(tmp_path, cache, monkeypatch):
    """10 steps on (data=2, fsdp=2, tensor=2) vs one device. Tolerance 1e-5 relative on the
    losses (measured 1e-7): the sharded program sums in a different order (float32).
    Both runs' logs are then held to what the issue lists (``check_run_logs``)."""
    # CPU has no FLOP/s peak and no memory statistics: give it both, so the trainer's MFU
    # and device-memory wiring is exercised (the MFU formula itself is tested by hand).
    monkeypatch.setattr("sft_jax.core.metrics.peak_flops", lambda kind: 1e12)
    monkeypatch.setattr("sft_jax.core.metrics.device_memory", lambda: {"bytes_in_use": 123, "peak_bytes_in_use": 456})
    runs = {}
    for name, devices, shape in [("one", jax.devices()[:1], "[1,1,1]"), ("mesh", jax.devices(), "[2,2,2]")]:
        cfg = tiny_config(tmp_path / name, "train.steps=10", f"mesh.shape={shape}", "train.micro_batch_size=4",
                          cache_dir=cache)
        counts = {}  # step -> (supervised, real) tokens of the batch the iterator produced

        def record(step, batch, counts=counts):
            counts[step + 1] = (float(batch["weights"].sum()), float((batch["segment_ids"] > 0).sum()))
            return batch

        before = core_step.TRACE_COUNTS["train"]
        result = run(cfg, SFTObjective, devices=devices, batch_transform=record)
        assert core_step.TRACE_COUNTS["train"] - before == 1  # one trace (so one compile) for the whole packed run
        assert result.status == "done" and result.step == 10
        runs[name] = losses(tmp_path / name)
        check_run_logs(tmp_path / name, cfg, n_devices=len(devices), counts=counts)
    assert sorted(runs["one"]) == list(range(1, 11))
    np.testing.assert_allclose([runs["mesh"][s] for s in range(1, 11)], [runs["one"][s] for s in range(1, 11)],
                               rtol=1e-5)
    assert runs["one"][10] < runs["one"][1]


def check_run_logs(out, cfg, n_devices, counts):
    """metrics.jsonl has every metric of the issue, each consistent with an independent
    computation (token counts: the batches the iterator produced, ``counts``); TensorBoard
    holds the same numbers; report.md embeds the four PNG plots and the data report."""
    _, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    G, T = cfg.train.global_batch_size, cfg.data.max_length
    model_cfg, _, _ = model_and_tokenizer(cfg)
    train = metrics(out)
    assert [r["step"] for r in train] == list(range(1, cfg.train.steps + 1))  # log_every=1
    rates = ("tokens_per_s", "supervised_tokens_per_s", "mfu", "step_time_s")
    # step 1 (compilation) is timed on its own; with log_every=1 its record is its window and has no rates
    assert train[0]["first_step_s"] > 0 and not set(rates) & set(train[0])
    assert all("first_step_s" not in r for r in train[1:])
    for r in train:
        assert {"loss", "supervised_tokens", "grad_norm", "clip_ratio", "lr", "bytes_in_use",
                "peak_bytes_in_use"} <= set(r)
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)  # lr of the update applied
        assert r["clip_ratio"] == pytest.approx(min(1.0, cfg.optim.clip_norm / r["grad_norm"]), rel=1e-6)
        assert 0 < r["supervised_tokens"] < G * T
        supervised, real = counts[r["step"]]
        assert r["supervised_tokens"] == supervised
        assert (r["bytes_in_use"], r["peak_bytes_in_use"]) == (123, 456)
        if r["step"] == 1:
            continue
        assert set(rates) <= set(r)
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(real, rel=1e-6)  # padding not counted
        # one step per record: the rates are the step's counts over its time
        assert r["supervised_tokens_per_s"] * r["step_time_s"] == pytest.approx(r["supervised_tokens"], rel=1e-6)
        assert r["supervised_tokens_per_s"] < r["tokens_per_s"] <= G * T / r["step_time_s"] * (1 + 1e-9)
        # MFU = computed tokens/s x 6N + 12LDT / (devices x peak), padding counted as computed
        want = G * T / r["step_time_s"] * model_cfg.flops_per_token(T) / (n_devices * 1e12)
        assert r["mfu"] == pytest.approx(want, rel=1e-6)
    assert any(r["clip_ratio"] < 1 for r in train)  # clipping happened at least once
    tb = tensorboard_scalars(out / "tb")
    for key in ("loss", "grad_norm", "clip_ratio", "lr", "tokens_per_s", "mfu"):
        assert tb[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in train if key in r}, rel=1e-6), key
    (final_eval,) = metrics(out, "eval")
    assert tb["eval/eval_loss"] == pytest.approx({cfg.train.steps: final_eval["eval_loss"]}, rel=1e-6)
    report = (out / "report.md").read_text()
    for name in ("loss", "lr", "grad_norm", "throughput"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"](plots/{name}.png)" in report
    data_report = (out / "data_report.md").read_text().strip()
    assert data_report and data_report.splitlines()[-1] in report


def test_bucket_mode_compiles_once_per_bucket_length(tmp_path, cache):
    widths = set()

    def record(step, batch):
        widths.add(batch["tokens"].shape[1])
        return batch

    cfg = tiny_config(tmp_path / "b", "train.steps=12", "data.batching=buckets", "data.buckets=[24,32,48,64]",
                      "train.global_batch_size=8", cache_dir=cache)
    before = core_step.TRACE_COUNTS["train"]
    run(cfg, SFTObjective, batch_transform=record)
    assert len(widths) >= 2, widths  # the test means something only with several lengths
    assert core_step.TRACE_COUNTS["train"] - before == len(widths)


def test_injected_nan_is_skipped_then_too_many_stop_the_run(tmp_path, cache):
    def poison(steps):
        def transform(step, batch):
            if step in steps:
                batch = dict(batch, weights=batch["weights"].copy())
                batch["weights"][0, 0] = np.nan
            return batch
        return transform

    cfg = tiny_config(tmp_path / "one", "train.steps=6", "optim.max_nonfinite_steps=2", cache_dir=cache)
    run(cfg, SFTObjective, batch_transform=poison({2}))
    records = {r["step"]: r for r in metrics(tmp_path / "one")}
    assert records[2]["nonfinite_total"] == 0 and records[3]["nonfinite_total"] == 1  # step index 2 is logged as 3
    assert records[6]["nonfinite_total"] == 1 and sorted(records) == list(range(1, 7))  # the steps move on
    assert records[4]["lr"] == records[3]["lr"] != records[2]["lr"]  # the skipped step did not advance the schedule

    # log_every=5 > checkpoint.every=2: the check before the step-4 save (the one that guards a
    # SIGTERM save between logs) must fire, before any log would ("by step 4", not 5)
    cfg = tiny_config(tmp_path / "many", "train.steps=8", "optim.max_nonfinite_steps=2", "checkpoint.every=2",
                      "train.log_every=5", cache_dir=cache)
    with pytest.raises(NonFiniteError, match=r"2 consecutive .* \(by step 4\).* last good checkpoint is step 2"):
        run(cfg, SFTObjective, batch_transform=poison({2, 3}))
    assert ckpt.latest_step(tmp_path / "many" / "checkpoints") == 2  # nothing after the skips was saved
    good = ckpt.restore(tmp_path / "many" / "checkpoints")  # and that checkpoint is whole and finite
    assert good["train_state"]["step"] == 2 and good["train_state"]["nonfinite_total"] == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good["params"]))


def test_checkpoint_from_4_devices_restores_on_2_and_8(tmp_path, cache):
    cfg = tiny_config(tmp_path / "r", "train.steps=3", "mesh.shape=[1,2,2]", "train.global_batch_size=4",
                      cache_dir=cache)
    run(cfg, SFTObjective, devices=jax.devices()[:4])
    root = tmp_path / "r" / "checkpoints"
    saved = ckpt.restore(root, with_opt_state=True)  # on one device: the reference values
    model_cfg = saved["model_config"]
    tx, _ = make_optimizer(cfg.optim, 3)
    for devices, shape in [(jax.devices()[:2], (1, 2, 1)), (jax.devices(), (2, 2, 2))]:
        mesh = shd.make_mesh(shape, devices)
        abstract, sh = sft.state_shardings(model_cfg, tx, mesh)
        out = ckpt.restore(root, params_target=abstract.params, opt_state_target=abstract.opt_state)
        for got, want, s in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(saved["params"]),
                                jax.tree.leaves(sh.params)):
            assert got.sharding == s and len(got.sharding.device_set) == len(devices)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for got, want in zip(jax.tree.leaves(out["opt_state"]), jax.tree.leaves(saved["opt_state"])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and training resumes from it (step 3, not from scratch) on all 8 devices
    first = metrics(tmp_path / "r")
    assert [r["step"] for r in first] == [1, 2, 3]
    cfg8 = tiny_config(tmp_path / "r", "train.steps=5", "mesh.shape=[2,2,2]", "train.global_batch_size=4",
                       cache_dir=cache)
    result = run(cfg8, SFTObjective)
    assert result.step == 5 and logged_steps(tmp_path / "r") == [1, 2, 3, 4, 5]
    assert metrics(tmp_path / "r")[:3] == first  # steps 1-3 untouched: not retrained, not relogged
    assert_trees_equal(ckpt.restore(root, step=3)["params"], saved["params"])


def test_hf_init_on_the_mesh_exports_what_it_loaded(tmp_path, cache):
    """init_from an HF directory: weights load straight into their shards on the
    (2,2,2) mesh, train (at a vanishing lr) on a local alpaca file, export to HF."""
    import json

    import transformers
    from hf_fixtures import make_hf_model, save_hf_model, train_tokenizer

    hf_dir = save_hf_model(make_hf_model(seed=0), tmp_path / "hf_in")
    train_tokenizer().save_pretrained(hf_dir)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."}
            for i in range(60)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path / "run", f"model.init_from={hf_dir}", f"data.train={data}", "data.format=alpaca",
                      "data.eval_fraction=0.1", "train.steps=3", "mesh.shape=[2,2,2]", "optim.lr=1e-12",
                      "run.export=true", "model.dtype=float32", cache_dir=cache)
    result = run(cfg, SFTObjective)
    assert result.status == "done" and "eval_loss" in result.eval
    before = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").state_dict()
    for key, value in before.items():
        np.testing.assert_allclose(after[key].numpy(), value.numpy(), atol=1e-6, err_msg=key)


def test_epochs_set_the_number_of_steps(tmp_path, cache):
    """0.1 epoch of 600 documents, one document per row (buckets), 8 rows a step: ceil(7.5) = 8
    steps, counted here by hand rather than from the iterator's own steps_per_epoch."""
    from sft_jax.data import build_datasets

    cfg = tiny_config(tmp_path / "e", "train.steps=0", "train.epochs=0.1", "data.batching=buckets",
                      "data.buckets=[64]", cache_dir=cache)
    _, tokenizer, _ = model_and_tokenizer(cfg)
    train_ds, _, _ = build_datasets(cfg.data, tokenizer, n_positions=64, vocab_size=len(tokenizer), seed=0)
    assert len(train_ds) == 600  # every demo document kept: the count below is the whole dataset
    result = run(cfg, SFTObjective)
    assert result.step == 8
