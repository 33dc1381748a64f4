"""python -m sft_jax.analyze: each measurement on a case whose answer is known, then the
command on a tiny run of 20 steps."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.models.gpt2 import GPT2
from sft_jax.objectives import sft
from sft_jax.analysis import compute, stability, tokens, variance
from sft_jax.analysis import studies as st
from sft_jax.models.gpt2 import GPT2Config
from train_fixtures import fixed_batches, tiny_config, train_cli, write_tiny_yaml


def _split_batch(rows=4, length=16, vocab=64):
    """Random rows, two documents each: first half prompt (weight 0), second half response."""
    batch = fixed_batches(1, rows, length, vocab)[0]
    seg = np.repeat(np.array([[1] * (length // 2) + [2] * (length // 2)]), rows, axis=0).astype(np.int32)
    weights = np.zeros((rows, length), np.float32)
    weights[:, 3:7] = 1.0  # response targets of document 1
    weights[:, 12:15] = 1.0  # of document 2
    pos = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(rows, 0).astype(np.int32)
    return dict(batch, segment_ids=seg, weights=weights, positions=pos)


# One tiny model with random weights (numpy: no init to compile) for the gradient tests, which
# share the analysis's one compiled program; references are jitted, not run op by op.
TINY = GPT2Config.preset("tiny", vocab_size=64, n_positions=16)


@pytest.fixture(scope="module")
def tiny_params():
    return compute.random_params(TINY, seed=0)


def test_gradient_split_prompt_part_is_zero_under_the_response_mask(tiny_params):
    cfg, params = TINY, tiny_params
    batch = _split_batch()
    masked = tokens.gradient_split(cfg, params, [(batch, batch["weights"])])
    assert masked["grad_norm_prompt"] == 0.0 and masked["prompt_share"] == 0.0
    assert masked["response_share"] == pytest.approx(1.0)
    # the response part is the trainer's own gradient of the summed response NLL
    trainer_grads = jax.jit(lambda p, b: sft.accumulated_grads(GPT2(cfg), p, b, 1))
    _, grads = trainer_grads(params, {k: jnp.asarray(v) for k, v in batch.items()})
    reference = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    reference *= batch["weights"].sum()
    assert masked["grad_norm_response"] == pytest.approx(reference, rel=1e-4)
    full = tokens.full_weights(batch)
    assert full[:, 7].sum() == 0 and full[:, 15].sum() == 0 and full[:, :7].all()  # no target across documents
    unmasked = tokens.gradient_split(cfg, params, [(batch, full)])
    assert unmasked["grad_norm_prompt"] > 0
    assert unmasked["prompt_share"] + unmasked["response_share"] == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_variance_fit_recovers_a_known_exponent(alpha):
    """Per-example gradients g_i ~ N(mu, T^alpha I): Var per bin = P T^alpha, so the fit finds alpha."""
    rng = np.random.default_rng(0)
    P, bins = 400, []
    for T in (2, 4, 8, 16, 32):
        g = rng.normal(size=(64, P)) * np.sqrt(T ** alpha) + 3.0
        bins.append((np.full(64, float(T)), variance.deviations(g)))
    fit = variance.fit_exponent(bins, n_boot=300)
    assert fit["exponent"] == pytest.approx(alpha, abs=0.03)
    assert fit["ci95"][0] < alpha < fit["ci95"][1] and fit["ci95"][1] - fit["ci95"][0] < 0.2
    assert variance.fit_exponent(bins, per_token=True, n_boot=50)["exponent"] == pytest.approx(alpha - 1, abs=0.03)
    assert variance.verdict(fit) == ("holds" if alpha == 1.0 else "does not hold")
    assert variance.verdict(None) == "inconclusive"


def test_noise_scale_of_known_gradients():
    """g_i = G + noise with tr(Σ) = P s^2: B_simple = P s^2 / |G|^2."""
    rng = np.random.default_rng(1)
    P, n, s = 500, 4000, 0.5
    G = np.full(P, 0.2)
    g = G + rng.normal(size=(n, P)) * s
    out = variance.noise_scale(np.sum(g * g, axis=1), float(np.sum(g.mean(0) ** 2)))
    assert out["B_simple"] == pytest.approx(P * s * s / np.sum(G * G), rel=0.05)


def test_model_per_example_statistics_match_a_loop(tiny_params):
    cfg, params = TINY, tiny_params
    batch = _split_batch(rows=5)
    total, sq, dev = variance.per_example_stats(cfg, params, batch)
    model = GPT2(cfg)
    row_grad = jax.jit(jax.grad(lambda p, row: sft.summed_nll(model, p, row, 0)))
    flat = []
    for i in range(5):
        g = row_grad(params, {k: jnp.asarray(v[i:i + 1]) for k, v in batch.items()})
        flat.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
    flat = np.stack(flat)
    np.testing.assert_allclose(sq, np.sum(flat ** 2, axis=1), rtol=1e-4)
    np.testing.assert_allclose(dev, variance.deviations(flat), rtol=1e-3)


def test_timing_fit_recovers_a_known_cost_curve():
    ts_ = [64, 128, 256, 512, 1024]
    seconds = [0.01 + 2e-4 * t + 3e-7 * t * t for t in ts_]
    fit = compute.fit_cost_curve(ts_, seconds)
    assert fit["c0"] == pytest.approx(0.01, rel=1e-6) and fit["c1"] == pytest.approx(2e-4, rel=1e-6)
    assert fit["c2"] == pytest.approx(3e-7, rel=1e-6)
    cfg = GPT2Config.preset("gpt2")
    f = [compute.flops(cfg, 1, t) for t in (512, 1024)]
    assert f[1]["attention"] / f[0]["attention"] == pytest.approx(4.0)
    assert f[1]["attention"] / f[1]["total"] < 0.5  # GPT-2 small at T = 1024: attention is a minority
    rows = compute.ratios(cfg, 1, {512: [1.0] * 5, 1024: [2.5, 2.5, 2.5, 2.5, 2.6]})
    assert rows[0]["measured"] == 2.5 and compute.verdict(rows) == "does not hold"


def test_stability_finds_a_planted_spike_and_the_lr_formula():
    rng = np.random.default_rng(0)
    gn = 1.0 + 0.05 * rng.random(100)
    loss = 2.0 - 0.001 * np.arange(100) + 0.01 * rng.random(100)
    gn[60] = 10.0
    loss[62] = 5.0
    found = stability.spikes(loss, gn)
    assert [s["index"] for s in found] == [60] and found[0]["loss_spike_follows"]
    cfg = tiny_config("/tmp/unused")
    from sft_jax.core.optimizer import lr_schedule  # the optimizer's own schedule against the written-out formula

    sched = lr_schedule(cfg.optim, 50)
    records = [{"step": s, "lr": float(sched(s - 1))} for s in range(1, 51)]
    assert stability.lr_deviation(records, cfg.optim, 50)["relative_to_peak"] < 1e-6


def test_prompt_copy_rate_of_known_responses():
    from sft_jax.analysis.training import prompt_copy_rate

    prompt = [1, 2, 3, 4, 5, 6]
    responses = [[1, 2, 3, 4, 9],  # 4-grams (1,2,3,4) found, (2,3,4,9) not: 1 of 2
                 [5, 6],  # n = 2: (5,6) found: 1 of 1
                 [6, 5, 4],  # n = 3: (6,5,4) not found: 0 of 1
                 [7],  # under 2 tokens: excluded
                 []]
    out = prompt_copy_rate([prompt] * 5, responses)
    assert out == {"rate": 2 / 4, "ngrams": 4, "responses": 3, "excluded_short": 2}
    assert np.isnan(prompt_copy_rate([prompt], [[1]])["rate"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """20 steps of the tiny config, then all seven studies, through the two command lines on one
    CPU device as a user runs them. They share a persistent compilation cache: the opt-in studies'
    short runs (the run's own 20 steps by default) load the trainer's programs instead of compiling.
    Smaller than the defaults: T = 64, 128 for the compute study, n/2 and n for the data-size study."""
    root = tmp_path_factory.mktemp("analyze")
    out = root / "run"
    config = write_tiny_yaml(root / "tiny.yaml", out, "train.steps=20", "train.log_every=5", cache_dir=root / "xla")
    done = train_cli(["--config", config], devices=None)
    assert done.returncode == 0, done.stdout + done.stderr
    studies = ",".join(st.DEFAULT_STUDIES + st.OPT_IN_STUDIES)
    done = train_cli([out, "--studies", studies, "--compute-max-len", "128", "--data-sizes", "2,1"], devices=None,
                     module="sft_jax.analyze")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| claim | study | verdict |" in done.stdout
    return out


def _sections(run_dir) -> dict:
    return {s["key"]: s for s in json.loads((run_dir / "analysis.json").read_text())["sections"]}


def test_analyze_on_a_tiny_run(tiny_run):
    sections = _sections(tiny_run)
    assert list(sections) == ["tokens", "variance", "stability", "compute", "memory", "masking", "data-size"]
    for s in sections.values():
        assert s["verdict"] in ("holds", "does not hold", "inconclusive")
        assert s["thresholds"] and s["claim"] and s["method"]
    tok = sections["tokens"]["numbers"]
    assert tok["L_A/L_Q"] == pytest.approx(tok["L_A"]["mean"] / tok["L_Q"]["mean"])
    assert "gradients_at_step_20" in tok
    assert sections["stability"]["numbers"]["steps"] == 20
    assert sorted(map(int, sections["compute"]["numbers"]["median_s"])) == [64, 128]
    mem = sections["memory"]["numbers"]
    assert mem["arguments_predicted_over_xla"] == 1.0
    md = (tiny_run / "analysis.md").read_text()
    assert "| claim | study | verdict |" in md and "MIN_LENGTH_RATIO = 2.0" in md
    assert "[analysis.md](analysis.md)" in (tiny_run / "report.md").read_text()
    plots = sections["variance"]["plots"] + sections["stability"]["plots"] + sections["compute"]["plots"]
    assert len(plots) == 3 and all(Path(p).is_file() for p in plots)


def test_analyze_cli_errors_are_one_line(tmp_path, capsys):
    from sft_jax.analyze import main

    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: not found" in err and len(err.strip().splitlines()) == 1
    assert main([str(tmp_path), "--data-sizes", "4,0"]) == 2
    err = capsys.readouterr().err
    assert "--data-sizes='4,0'" in err and len(err.strip().splitlines()) == 1


def test_opt_in_studies_on_a_tiny_run(tiny_run):
    """masking and data-size trained short schedules through the real trainer into analysis_runs/."""
    from sft_jax.analysis import training
    from sft_jax.analysis.run import load_run
    from sft_jax.analyze import parse_args
    from sft_jax.config import load_config
    from sft_jax.core.metrics import read_metrics

    def steps_of(out):
        return max(r["step"] for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train")

    run = load_run(tiny_run)
    steps = training.study_steps(run)
    assert steps == 20  # the default: min(STUDY_STEPS, the run's steps)
    sections = _sections(tiny_run)
    masking = sections["masking"]
    assert masking["verdict"] in ("holds", "does not hold", "inconclusive")
    for name, on_prompt in (("response_only", False), ("full_loss", True)):
        out = tiny_run / "analysis_runs" / name
        assert load_config(out / "config.yaml").data.train_on_prompt is on_prompt
        assert steps_of(out) == steps
        assert np.isfinite(masking["numbers"][name]["eval_loss_response"])
    copy = masking["numbers"]["reference_copy"]
    assert copy["responses"] + copy["excluded_short"] == len(training.copy_examples(run)[0])
    # the response-only run's eval loss is the loss of the restored final checkpoint on the eval docs
    from sft_jax.core import checkpoint as ckpt

    params = ckpt.restore(tiny_run / "analysis_runs" / "response_only" / "checkpoints")["params"]
    docs = np.arange(min(training.LOSS_DOCS, len(run.eval_ds)))
    assert masking["numbers"]["response_only"]["eval_loss_response"] == pytest.approx(
        training.mean_nll(run.model_cfg, params, run.eval_ds, docs), rel=1e-6)

    sizes = sections["data-size"]
    rows = sizes["numbers"]["sizes"]
    n = len(run.train_ds)
    assert [r["n"] for r in rows] == [n // 2, n]  # --data-sizes 2,1
    assert parse_args(["RUN"]).data_sizes == "8,4,2,1" and st.Options().data_sizes == (8, 4, 2, 1)
    for r in rows:
        assert r["gap"] == pytest.approx(r["eval_loss"] - r["train_loss"])
        assert steps_of(tiny_run / "analysis_runs" / f"data_{r['n']}") == steps
    assert sizes["verdict"] in ("holds", "does not hold", "inconclusive")
    assert len(sizes["plots"]) == 1 and Path(sizes["plots"][0]).is_file()
