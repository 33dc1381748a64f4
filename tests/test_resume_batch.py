"""Resuming a run with another global batch size: with packing the data continues from the next
unseen row and the optimizer (step count, lr schedule) from the checkpoint's step; with buckets
the run refuses with one line. Both show up in the run's record."""

from __future__ import annotations

import jax
import numpy as np

from sft_jax.core import checkpoint as ckpt
from sft_jax import train
from sft_jax.data import BatchIterator, build_datasets
from sft_jax.core.optimizer import make_optimizer
from sft_jax.core.loop import run
from sft_jax.objectives.sft import SFTObjective
from sft_jax.core.setup import model_and_tokenizer
from train_fixtures import metrics, tiny_config, write_tiny_yaml


def recorder(store: list):
    def record(step, batch):
        store.append((step, batch["tokens"].copy()))
        return batch
    return record


def test_packing_resume_with_a_larger_batch_then_buckets_refuse(tmp_path, capsys):
    out = tmp_path / "run"
    small, big = [], []
    cfg_small = tiny_config(out, "train.steps=2", "train.global_batch_size=4")
    assert run(cfg_small, SFTObjective, devices=jax.devices()[:1], batch_transform=recorder(small)).status == "done"
    cfg_big = tiny_config(out, "train.steps=4", "train.global_batch_size=8")
    assert run(cfg_big, SFTObjective, devices=jax.devices()[:1], batch_transform=recorder(big)).status == "done"
    assert "batch size changed at step 2 (4 -> 8); the data continues from the next unseen row" in capsys.readouterr().err

    # the rows fed: those of the uninterrupted 4-row stream, none skipped or repeated
    assert [s for s, _ in small + big] == [0, 1, 2, 3]
    model_cfg, tokenizer, _ = model_and_tokenizer(cfg_small)
    train_ds, _, _ = build_datasets(cfg_small.data, tokenizer, n_positions=64, vocab_size=model_cfg.vocab_size,
                                    seed=0, global_batch_size=4)
    stream = BatchIterator(train_ds, global_batch_size=4, seed=0, max_length=64, prefetch=0)
    expected = np.concatenate([next(stream)["tokens"] for _ in range(6)])
    np.testing.assert_array_equal(np.concatenate([t for _, t in small + big]), expected)

    # the optimizer continues from the checkpoint's step: steps 3 and 4 are updates 2 and 3 of
    # the (now 4-step) schedule, not a restart of its warmup
    _, schedule = make_optimizer(cfg_big.optim, 4)
    lrs = {r["step"]: r["lr"] for r in metrics(out)}
    np.testing.assert_allclose([lrs[3], lrs[4]], [schedule(2), schedule(3)], rtol=1e-6)
    assert schedule(0) != schedule(2)
    data = ckpt.restore(out / "checkpoints")["train_state"]["data"]
    assert data["rows"] == 2 * 4 + 2 * 8 and data["batch_size_changes"] == [[2, 4, 8]]
    assert "batch size changed at step 2 (4 -> 8)" in (out / "report.md").read_text()

    # buckets plan whole batches: another batch size is refused with one line, nothing written
    config = write_tiny_yaml(tmp_path / "buckets.yaml", out, "train.steps=6", "train.global_batch_size=16",
                             "data.batching=buckets", "data.buckets=[32,64]")
    before = sorted(p.name for p in out.iterdir())
    assert train.main(["--config", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("sft_jax:")]  # progress
    assert len(err) == 1 and "step 4 was trained with global_batch_size=8, this run asks for 16" in err[0], err
    assert "resume with train.global_batch_size=8, or use data.batching=packing" in err[0]
    assert sorted(p.name for p in out.iterdir()) == before
