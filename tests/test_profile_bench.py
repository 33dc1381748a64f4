"""The step-profile summariser on a synthetic Perfetto trace, and the bench's packed rows:
the same rows on both sides (HF with position ids and a 4D block-diagonal mask) give the same loss."""

import gzip
import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _profile_step():
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summariser_sums_device_op_time_by_name(tmp_path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.1", "ts": 0, "dur": 30.0},
        {"ph": "X", "pid": 1, "tid": 8, "name": "cudnn_flash", "ts": 40, "dur": 70.0},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.1", "ts": 100, "dur": 20.0},
        {"ph": "X", "pid": 2, "tid": 1, "name": "fusion.1", "ts": 0, "dur": 1000.0},  # host: not counted
        {"ph": "i", "pid": 1, "tid": 7, "name": "marker", "ts": 5},  # instant: no duration
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    ps = _profile_step()
    summary = ps.summarise(ps.load_trace(ps.find_trace(tmp_path)))
    assert summary["total_us"] == 120.0 and summary["processes"] == ["/device:GPU:0"]
    assert [(o["name"], o["us"], o["count"]) for o in summary["ops"]] == [("cudnn_flash", 70.0, 1), ("fusion.1", 50.0, 2)]
    assert abs(summary["ops"][1]["share"] - 50 / 120) < 1e-12
    host = ps.summarise(ps.load_trace(path), device="^/host:CPU")
    assert host["total_us"] == 1000.0
    assert "| `fusion.1` | 0.025 | 41.7% | 2 |" in ps.summary_markdown(summary, "t", steps=2)


def test_packed_rows_give_both_frameworks_the_same_loss():
    torch = pytest.importorskip("torch")
    from sft_jax import bench
    from sft_jax.models.gpt2 import GPT2, GPT2Config, init_params, token_nll

    cfg = GPT2Config.preset("tiny", n_positions=256)
    jb, hf = bench.make_packed_batch(cfg, batch=2, seq=256, seed=0)
    seg = jb["segment_ids"]
    assert seg.max() >= 2 and (jb["weights"].sum(1) > 0).all()  # several documents a row, supervised tokens
    lengths = np.concatenate([np.bincount(r)[1:] for r in seg])
    assert lengths[lengths > 0].min() >= 29  # documents in [30, 600] tokens (a cut prompt aside)
    params = init_params(cfg, jax.random.key(0))
    hidden = GPT2(cfg).apply(params, jb["tokens"], jb["positions"], jb["segment_ids"], return_hidden=True)
    nll = np.asarray(token_nll(params["params"]["wte"], hidden, jb["targets"], cfg))
    want = float((nll * jb["weights"]).sum() / jb["weights"].sum())
    model = bench.torch_reference().torch_model(cfg, jax.device_get(params["params"]), "cpu")
    with torch.no_grad():
        got = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()}).loss.item()
    assert abs(got - want) < 1e-4
