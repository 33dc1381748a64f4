"""MFU and FLOPs arithmetic, the metrics logger's file formats and resume rule, the report,
and the benchmark (which must compare the same computation on both frameworks)."""

import json
import math
import re

import numpy as np
import pytest

from sft_jax.core import metrics
from sft_jax.core.metrics import MetricsLogger, read_metrics
from sft_jax.models.gpt2 import GPT2Config
from sft_jax.core.report import write_report


# --- FLOPs and MFU -----------------------------------------------------------------

def test_flops_per_token_matches_a_hand_count_of_the_matmuls():
    cfg = GPT2Config.preset("tiny")
    D, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, 128
    # Forward FLOPs of one token, 2 per multiply-add: per layer the q|k|v projection,
    # the attention output projection, the two MLP matmuls, then QK^T and AV against
    # all T keys (causal mask not discounted); then the tied LM head.
    per_layer = 2 * D * 3 * D + 2 * D * D + 2 * D * 4 * D + 2 * 4 * D * D + 2 * T * D + 2 * T * D
    forward = L * per_layer + 2 * D * V
    matmul_train = 3 * forward  # backward costs twice the forward
    # 6N also counts the biases and LayerNorm parameters, which no matmul touches.
    biases = L * (3 * D + D + 4 * D + D)  # c_attn, attn c_proj, c_fc, mlp c_proj
    layer_norms = L * 2 * (2 * D) + 2 * D  # ln_1, ln_2 (scale and bias) per layer; ln_f
    non_matmul_params = biases + layer_norms
    assert cfg.flops_per_token(T) == matmul_train + 6 * non_matmul_params
    assert cfg.flops_per_token(T, training=False) == pytest.approx(cfg.flops_per_token(T) / 3)


def test_mfu_by_hand_on_h100():
    cfg = GPT2Config.preset("gpt2")
    assert cfg.num_params() == 124_439_808  # HF's count for gpt2
    fpt = cfg.flops_per_token(1024)
    # 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert fpt == 6 * 123_653_376 + 113_246_208 == 855_166_464
    got = metrics.mfu(50_000.0, fpt, 8, "NVIDIA H100 80GB HBM3")
    assert got == pytest.approx(50_000 * 855_166_464 / (8 * 989e12))
    assert got == pytest.approx(0.0054042, rel=1e-4)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("cpu", None), ("Some Future Chip", None),
])
def test_peak_flops_from_device_kind(kind, peak):
    assert metrics.peak_flops(kind) == peak
    assert (metrics.mfu(1e5, 1e9, 1, kind) is None) == (peak is None)


def test_device_memory_is_none_on_cpu():
    assert metrics.device_memory() is None


# --- MetricsLogger -----------------------------------------------------------------

def _train_steps(records):
    return [r["step"] for r in records if r["split"] == "train"]


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, total_steps=4) as log:
        for step in range(1, 5):
            log.log(step, {"loss": 2.0 / step, "lr": 1e-4, "tokens_per_s": 1000.0 + step})
        log.log_eval(4, {"eval_loss": 0.7, "eval_ppl": math.exp(0.7)})
        log.log_text(4, "sample/0", "Hello")
        log.log(5, {"loss": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is valid JSON on its own
    assert _train_steps(records) == [1, 2, 3, 4, 5]
    assert records[0]["loss"] == 2.0 and records[0]["split"] == "train" and "time" in records[0]
    assert records[4] == {**records[4], "split": "eval", "step": 4, "eval_loss": 0.7}
    assert records[5]["text"] == "Hello" and records[5]["split"] == "text"
    assert records[-1]["loss"] is None  # NaN has no JSON spelling
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_progress_bar_shows_loss_tokens_per_s_and_eta(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=6) as log:
        for step in range(1, 4):
            log.log(step, {"loss": 1.0 / step, "tokens_per_s": 1234.0})
    bar = capsys.readouterr().err.split("\r")[-1]  # the last redraw, at close
    # tqdm's "done/total [elapsed<remaining, rate, postfix]": the remaining time is the ETA
    assert re.search(r"3/6 \[\d+:\d\d<\d+:\d\d, .*loss=0\.3333, tok/s=1\.23e\+03\]", bar), bar


def test_logger_tensorboard_holds_the_jsonl_numbers(tmp_path):
    from train_fixtures import tensorboard_scalars

    with MetricsLogger(tmp_path, total_steps=3) as log:
        for step in range(1, 4):
            log.log(step, {"loss": 2.0 / step, "grad_norm": 0.5 * step, "nonfinite": False})
        log.log_eval(3, {"eval_loss": 0.7})
    tb = tensorboard_scalars(tmp_path / "tb")
    assert tb["train/loss"] == pytest.approx({1: 2.0, 2: 1.0, 3: 2 / 3})
    assert tb["train/grad_norm"] == pytest.approx({1: 0.5, 2: 1.0, 3: 1.5})
    assert tb["eval/eval_loss"] == pytest.approx({3: 0.7}) and "train/nonfinite" not in tb  # booleans stay out


def test_logger_starts_without_importing_torch(tmp_path):
    """In a fresh process with torch installed (the test extra): a logger writes its TensorBoard
    scalars without loading torch (5-15 s at every training start), and torch imports after it."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from sft_jax.core.metrics import MetricsLogger\n"
        "assert 'torch' not in sys.modules\n"
        f"with MetricsLogger({str(tmp_path)!r}, total_steps=1) as log:\n"
        "    log.log(1, {'loss': 1.5})\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
        "import torch\n"
        "print('torch then:', torch.tensor([1.0]).sum().item())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch loaded: False" in done.stdout and "torch then: 1.0" in done.stdout, done.stdout
    from train_fixtures import tensorboard_scalars

    assert tensorboard_scalars(tmp_path / "tb")["train/loss"] == pytest.approx({1: 1.5})


def test_logger_resume_drops_the_redone_steps(tmp_path):
    with MetricsLogger(tmp_path, total_steps=12) as log:
        for step in range(1, 11):
            log.log(step, {"loss": 1.0})
            if step % 5 == 0:
                log.log_eval(step, {"eval_loss": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "split": "tr')  # killed mid-write
    # Resume from the checkpoint of step 5: its log and eval stay, the run redoes 6..
    with MetricsLogger(tmp_path, total_steps=12, start_step=5) as log:
        for step in range(6, 13):
            log.log(step, {"loss": 0.5})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert _train_steps(records) == list(range(1, 13))
    assert [r["step"] for r in records if r["split"] == "eval"] == [5]
    assert [r["loss"] for r in records if r["split"] == "train"] == [1.0] * 5 + [0.5] * 7


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "out", enabled=False, total_steps=3)
    log.log(1, {"loss": 1.0})
    log.log_eval(1, {"eval_loss": 1.0})
    log.log_text(1, "t", "x")
    log.close()
    assert not (tmp_path / "out").exists()


# --- throughput windows ------------------------------------------------------------

def test_each_window_is_timed_after_its_steps_ran_on_the_device(tmp_path, monkeypatch):
    """Steps get extra device work that the host does not wait for: heavy in the windows ending
    at steps 2 and 6 (log_every=2), light in the one ending at 4. Each heavy window's step_time_s
    covers its steps' device work (timed alone afterwards), and the light window between them
    reads less: timed at dispatch, a window reads the previous window's device time instead. The
    first step (compilation) is logged on its own, first_step_s, and is in no window."""
    import time

    import jax
    import jax.numpy as jnp

    from sft_jax.core import loop as core_loop
    from sft_jax.core import step as core_step
    from sft_jax.objectives.sft import SFTObjective
    from train_fixtures import metrics as logged, tiny_config

    @jax.jit
    def busy(seed, count):  # count 256 x 256 matmuls, after the step (it reads the step's loss)
        x = jnp.full((256, 256), 1.0 / 256, jnp.float32) * (1.0 + 0.0 * seed)
        return jnp.sum(jax.lax.fori_loop(0, count, lambda i, a: jnp.tanh(a @ a), x))

    heavy, light = 1000, 4
    work = {1: light, 2: heavy, 3: light, 4: light, 5: heavy, 6: heavy}  # by step
    busy(jnp.float32(0), light).block_until_ready()  # compiled before the run
    make = core_step.make_train_step

    def slow_device(*args, **kwargs):
        step, calls = make(*args, **kwargs), [0]

        def run_step(state, batch, frozen=None):
            state, out = step(state, batch, frozen)
            calls[0] += 1
            return state, {**out, "busy": busy(out["loss"], work[calls[0]])}

        run_step.batch_shardings = step.batch_shardings
        return run_step

    monkeypatch.setattr(core_step, "make_train_step", slow_device)
    cfg = tiny_config(tmp_path / "run", "train.steps=6", "train.log_every=2")
    assert core_loop.run(cfg, SFTObjective, devices=jax.devices()[:1]).status == "done"
    alone = []
    for _ in range(3):
        t0 = time.perf_counter()
        busy(jnp.float32(0), heavy).block_until_ready()
        alone.append(time.perf_counter() - t0)
    heavy_s = min(alone)  # one heavy step's extra device time
    records = {r["step"]: r for r in logged(tmp_path / "run")}
    times = {s: round(r["step_time_s"], 3) for s, r in records.items()}
    print(f"heavy work {heavy_s:.3f} s alone; first_step_s {records[2]['first_step_s']:.2f}; step_time_s {times}")
    assert sorted(records) == [2, 4, 6] and records[2]["first_step_s"] > 0
    assert all("first_step_s" not in records[s] for s in (4, 6))
    assert min(times[2], times[6]) >= 0.5 * heavy_s, (times, heavy_s)
    assert times[4] < 0.5 * min(times[2], times[6]), times


# --- report ------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_embeds_plots_summary_and_data_report(tmp_path):
    with MetricsLogger(tmp_path, total_steps=20) as log:
        for step in range(1, 21):
            log.log(step, {"loss": 3.0 - 0.1 * step, "lr": 1e-4 * min(1, step / 5), "grad_norm": 1.5 / step,
                           "clip_ratio": min(1.0, step / 1.5), "tokens_per_s": 1e4, "mfu": 0.4})
            if step % 10 == 0:
                log.log_eval(step, {"eval_loss": 2.0, "exact_match": 0.25})
        log.log_text(20, "sample/0", "The answer is 4.")
    report = write_report(tmp_path, data_report_md="## Data\n\n| split | rows |\n| --- | --- |\n| train | 123 |",
                          summary={"wall_time_s": 75.0, "run": "unit-test"})
    text = report.read_text()
    for name in ("loss", "lr", "grad_norm", "throughput", "exact_match"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{name}.png)" in text
    assert "| final train loss | 1.0000 |" in text
    assert "| eval loss | 2.0000 |" in text
    assert f"| eval perplexity | {math.exp(2.0):.3f} |" in text
    assert "| exact match | 25.00% |" in text
    assert "| MFU (median) | 40.0% |" in text
    assert "| steps | 20 |" in text
    assert "| wall time | 1m15s |" in text
    assert "| run | unit-test |" in text
    assert "| train | 123 |" in text and "The answer is 4." in text
    assert "rl_" not in text  # no rollouts: no RL figures


def test_report_copes_with_missing_keys(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3) as log:
        for step in range(1, 4):
            log.log(step, {"loss": 1.0 / step})
    report = write_report(tmp_path, data_report_md=None, summary={})
    text = report.read_text()
    assert (tmp_path / "plots" / "loss.png").exists()
    assert not (tmp_path / "plots" / "lr.png").exists() and "lr.png" not in text
    assert "| eval loss | — |" in text and "| MFU (median) | — |" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No metrics were logged" in write_report(empty, data_report_md=None, summary={}).read_text()


# --- benchmark ---------------------------------------------------------------------

def test_bench_runs_both_frameworks_on_the_same_computation(monkeypatch):
    """Same weights, same batch, same masked loss, and the same optimizer step: the loss
    agrees before any update and after one and two (AdamW, schedule, clipping, decay mask
    on both sides). The per-step losses are read by wrapping ``bench._timed``."""
    pytest.importorskip("torch")
    from sft_jax import bench

    from sft_jax.core import step as core_step

    step_losses = []  # one list per framework, in run order (torch, then jax)
    timed = bench._timed

    def recording(step, warmup, steps):
        pending = []
        out = timed(lambda: pending.append(step()) or pending[-1], warmup, steps)
        step_losses.append([read() for read in pending])
        return out

    monkeypatch.setattr(bench, "_timed", recording)
    traces = core_step.TRACE_COUNTS["train"]
    # no warmup: the lr is the peak from the first update, so both later losses follow real updates
    results = bench.benchmark("tiny", batch=2, seq=64, steps=3, warmup=0, dtype="float32")
    assert core_step.TRACE_COUNTS["train"] == traces + 1  # the trainer's own step, traced once
    for side in ("jax", "torch"):
        r = results[side]
        for key in ("first_loss", "step_time_s", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (side, key, r[key])
        assert r["mfu"] is None  # CPU has no peak
    assert math.isfinite(results["jax_over_torch"]) and results["jax_over_torch"] > 0
    assert abs(results["jax"]["first_loss"] - results["torch"]["first_loss"]) < 1e-4
    torch_losses, jax_losses = step_losses
    assert len(jax_losses) == len(torch_losses) == 3  # before any update, after one, after two
    assert jax_losses[0] == results["jax"]["first_loss"] and torch_losses[0] == results["torch"]["first_loss"]
    assert jax_losses[2] < jax_losses[1] - 1e-3 < jax_losses[0] - 2e-3  # each update moved the loss
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=0, atol=1e-4)
    assert "| jax |" in bench.markdown_table(results) and "| torch |" in bench.markdown_table(results)
