"""A finished (or running) training run, as the analysis reads it: config, model, data, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from sft_jax.core import checkpoint as ckpt
from sft_jax.config import Config, ConfigError, load_config
from sft_jax.core.metrics import MetricsLogger, read_metrics
from sft_jax.models.family import ModelConfig, family_of


class AnalysisError(ValueError):
    """The run directory cannot be analysed (missing config, no data, ...)."""


@dataclasses.dataclass
class Run:
    directory: Path
    config: Config
    model_cfg: ModelConfig  # float32 compute, no remat: gradients for the analysis are exact
    tokenizer: Any
    hf_dir: Optional[Path]
    train_ds: Any  # sft_jax.data.SFTDataset
    eval_ds: Any
    records: list  # metrics.jsonl

    @property
    def checkpoint_root(self) -> Path:
        return self.directory / "checkpoints"

    def train_records(self) -> list[dict]:
        return [r for r in self.records if r.get("split") == "train"]

    @functools.cached_property
    def _initial(self):
        if self.hf_dir is not None:
            from sft_jax.models import hf_io

            return on_first_device(hf_io.load_hf(self.hf_dir, dtype="float32")[1])
        return on_first_device(seeded_init(self.model_cfg, self.config.train.seed))

    def initial_params(self):
        """The model before training: ``model.init_from``'s weights, or the seeded init (as the trainer)."""
        return self._initial

    @functools.cached_property
    def _latest(self):
        root = self.checkpoint_root
        if not root.is_dir() or ckpt.latest_step(root) is None:
            return None, None
        out = ckpt.restore(root, with_tokenizer=False)
        return out["step"], on_first_device(out["params"])

    def latest_checkpoint(self):
        """(step, params) of the newest complete checkpoint, or (None, None); restored once."""
        return self._latest


# The init runs once: compiled without LLVM's optimisations it compiles about 4x faster (demo
# model on CPU: 1.4 s against 6.4 s) and gives the same weights up to float rounding (7e-9).
RUN_ONCE = {"xla_backend_optimization_level": 0}


def seeded_init(cfg: ModelConfig, seed: int):
    """``init_params`` under one jit, as the trainer runs it (op by op, its layer scan alone
    takes many seconds to compile on CPU)."""
    return _compiled_init(cfg)(jax.random.key(seed))


@functools.lru_cache(maxsize=4)
def _compiled_init(cfg: ModelConfig):
    init = jax.jit(lambda key: family_of(cfg).init_params(cfg, key))
    return init.lower(jax.random.key(0)).compile(compiler_options=RUN_ONCE)


def on_first_device(tree):
    """Committed to the first local device, where a restored checkpoint lands: parameters from
    the init and from a checkpoint then hit the same compiled programs."""
    return jax.device_put(tree, jax.local_devices()[0])


def load_run(directory) -> Run:
    """Read ``directory/config.yaml`` and rebuild the run's model config, tokenizer and datasets."""
    from sft_jax.data import build_datasets
    from sft_jax.core.setup import model_and_tokenizer

    directory = Path(directory)
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        raise AnalysisError(f"{config_file}: not found; RUN_DIR must be a training run's output_dir")
    try:
        config = load_config(config_file)
    except ConfigError as e:
        raise AnalysisError(f"{config_file}: {e}") from None
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir=str(directory)))
    model_cfg, tokenizer, hf_dir = model_and_tokenizer(config)
    model_cfg = model_cfg.replace(dtype="float32", remat="none", attention="xla")
    train_ds, eval_ds, _ = build_datasets(config.data, tokenizer, n_positions=model_cfg.max_position_embeddings,
                                          vocab_size=model_cfg.vocab_size, seed=config.train.seed,
                                          global_batch_size=config.train.global_batch_size)
    records = read_metrics(directory / MetricsLogger.FILENAME)
    return Run(directory, config, model_cfg, tokenizer, hf_dir, train_ds, eval_ds, records)


def one_doc_rows(dataset, indices, width: int) -> dict[str, np.ndarray]:
    """A batch with one document per row (rows padded to ``width``), as the trainer lays rows out."""
    from sft_jax.data.pack import assemble

    return assemble(dataset, [[int(i)] for i in indices], width)


def row_width(dataset, indices, multiple: int = 64) -> int:
    """The smallest multiple of ``multiple`` that holds every chosen document (one compile for all)."""
    longest = int(dataset.lengths[np.asarray(indices)].max())
    return -(-longest // multiple) * multiple
