"""Training metrics: MFU, device memory, and one logger that feeds a JSONL file,
TensorBoard, a tqdm progress bar and, optionally, Weights & Biases.

MFU (model FLOPs utilisation) is the fraction of the chips' dense peak that the model's
own arithmetic would need at the measured speed:

    MFU = tokens_per_s * flops_per_token / (n_devices * peak_flops_per_device)
    flops_per_token = 6 N + 12 L D T        (PaLM, Chowdhery et al. 2022, appendix B)

N is the parameter count without the position embeddings (a lookup, not a matmul; the
tied token embedding stays in because it is also the LM head's matmul), L layers, D width,
T sequence length. 6N counts forward (2N) plus backward (4N) matmul FLOPs; 12 L D T counts
QK^T and AV in forward and backward, without discounting the causal mask. Recomputation
(remat) is deliberately not counted: that would be hardware FLOPs utilisation, not MFU.
Each family's config (``flops_per_token``) holds the formula; this module only divides.

Metric keys the logger and ``sft_jax.core.report`` understand (anything else is logged too):

  train: loss, lr, grad_norm, clip_ratio (fraction of the gradient kept by global-norm
         clipping, min(1, max_norm / grad_norm)), tokens_per_s, mfu, step_time_s,
         bytes_in_use, peak_bytes_in_use; first_step_s in the first record of each start
  eval:  eval_loss, eval_ppl, exact_match

tokens_per_s, mfu and step_time_s are the steps of one logging window over its wall time,
read after the host has waited for the device to finish them. The first step of a start
(compilation, the objective's first rollout or reference pass, the step) is left out of
every window and logged as first_step_s; a window made of that step alone has no rate.
Evaluations and checkpoint writes during training are left out of the window's time.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import jax

# Dense (no 2:4 sparsity) bf16 peak FLOP/s of one JAX device, keyed by a lower-case
# substring of ``device.device_kind``. Checked in order, so the specific names come
# before the general ones. JAX reports e.g. "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L4",
# "TPU v4", "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p" (v5p), "TPU v6 lite" (v6e), "cpu".
PEAK_FLOPS: tuple[tuple[str, Optional[float]], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM ("80GB HBM3"); NVIDIA's sheet says 1979e12 with sparsity
    ("h200", 989e12),  # also GH200: the same Hopper tensor cores and clocks
    ("a100", 312e12),  # SXM and PCIe share the number
    ("l4", 121e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5" (newer runtimes "TPU v5p")
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("cpu", None),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one device of this kind; None when unknown or CPU."""
    kind = device_kind.lower()
    for pattern, peak in PEAK_FLOPS:
        if pattern in kind:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, device_kind: str) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1] (see the module docstring); None without a known peak."""
    peak = peak_flops(device_kind)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (n_devices * peak)


def device_memory(device: Optional[jax.Device] = None) -> Optional[dict]:
    """{'bytes_in_use', 'peak_bytes_in_use'} of one device (default: the first local one);
    None where the backend keeps no statistics (CPU)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    if not stats:
        return None
    return {key: stats.get(key) for key in ("bytes_in_use", "peak_bytes_in_use")}


def _plain(value: Any) -> Any:
    """JSON-safe value: jax/numpy numbers to Python; NaN and inf to None (JSON has no NaN)."""
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        value = value.item()
    elif hasattr(value, "tolist"):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX probes ``import torch`` at import time only so that it can accept torch tensors;
    this logger writes Python floats. With torch installed (the test extra, most GPU images) that
    probe costs 5 to 10 s at every training start, so it is answered "not installed" for the
    duration of the import, unless torch is already loaded. A later ``import torch`` is unaffected."""
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # import torch -> ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    """Writes each logged step to ``output_dir/metrics.jsonl`` (one JSON object a line,
    flushed), to TensorBoard under ``output_dir/tb``, and to a tqdm bar with ETA.

    ``step`` counts completed optimizer updates, and ``start_step`` is the step of the
    checkpoint a run resumes from (0 for a fresh run). Everything logged at or before that
    step describes the restored state and stays; entries the interrupted run wrote at
    ``step > start_step`` are dropped, because the resumed run redoes those steps (and its
    first log is after ``start_step``). So the file stays monotonic with no gap and no
    duplicate; TensorBoard gets the same cut through ``purge_step``. A torn last line
    (killed mid-write) is dropped too.

    Every record carries ``step``, ``split`` ("train", "eval" or "text") and ``time``
    (Unix seconds). With ``enabled=False`` (processes other than 0) every method is a no-op
    and nothing is created.

    ``wandb_project`` (``run.wandb_project``) also sends every record to Weights & Biases
    (``pip install 'sft_jax[wandb]'``), under ``train/`` and ``eval/`` like TensorBoard, with
    ``wandb_config`` (the run's config) attached; wandb is imported only then.
    """

    FILENAME = "metrics.jsonl"

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True, total_steps: int, start_step: int = 0,
                 wandb_project: Optional[str] = None, wandb_name: Optional[str] = None,
                 wandb_config: Optional[dict] = None):
        self.enabled = enabled
        self.path = Path(output_dir) / self.FILENAME
        self._wandb = None
        if not enabled:
            return
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("run.wandb_project is set but wandb is not installed: "
                                  "pip install 'sft_jax[wandb]'") from None
            id_file = Path(output_dir) / "wandb_run_id"  # a resumed run continues the same W&B run
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=wandb_config,
                                     dir=str(output_dir), id=id_file.read_text().strip(), resume="allow")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        from tqdm.auto import tqdm

        summary_writer = _summary_writer_class()
        self._tb = summary_writer(str(Path(output_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _write(self, step: int, split: str, fields: Mapping[str, Any]) -> dict:
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({k: _plain(v) for k, v in fields.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def _scalars(self, record: dict, prefix: str) -> None:
        for key, value in record.items():
            if key not in ("step", "split", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split", "time")},
                            step=record["step"])

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One training step's metrics (see the module docstring for the usual keys)."""
        if not self.enabled:
            return
        record = self._write(step, "train", metrics)
        self._scalars(record, "train")
        postfix = {}
        if record.get("loss") is not None:
            postfix["loss"] = f"{record['loss']:.4f}"
        if record.get("tokens_per_s") is not None:
            postfix["tok/s"] = f"{record['tokens_per_s']:.3g}"
        if postfix:  # before the update, whose redraw then shows this step's numbers
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(0, step - self._bar.n))  # tqdm's ETA: remaining steps at the recent rate

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Evaluation metrics (eval_loss, eval_ppl, exact_match, ...) at a training step."""
        if not self.enabled:
            return
        record = self._write(step, "eval", metrics)
        self._scalars(record, "eval")
        shown = " ".join(f"{k}={v:.4g}" for k, v in record.items()
                         if k not in ("step", "split", "time") and isinstance(v, (int, float)))
        self._bar.write(f"step {step}: {shown}")

    def log_split(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Metrics of another kind at a training step (e.g. PPO's "rollout" statistics)."""
        if not self.enabled:
            return
        self._scalars(self._write(step, split, metrics), split)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A generated sample (or any text) under ``tag``."""
        if not self.enabled:
            return
        self._write(step, "text", {"tag": tag, "text": text})
        self._tb.add_text(tag, text, step)
        if self._wandb is not None:
            self._wandb.log({f"text/{tag}": text}, step=int(step))

    def close(self) -> None:
        if not self.enabled or self._file.closed:
            return
        self._bar.close()
        self._tb.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All well-formed records of a metrics.jsonl (a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Keep only the records up to ``start_step``; rewrite atomically if anything goes."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= start_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
