"""Orbax checkpoints that carry everything needed to convert and generate on their own.

A checkpoint directory is an orbax ``CheckpointManager`` root; each step dir (``<root>/<step>``)
holds these items:

  params        StandardSave of the float32 params pytree (sharded arrays are saved sharded)
  opt_state     StandardSave of the optimizer state (optional)
  model_config  JsonSave of the model config's fields and its ``model_type`` (which family reads it;
                absent in older checkpoints, which hold GPT-2)
  tokenizer     JsonSave of {filename: text} from ``tokenizer.save_pretrained`` (optional;
                includes the chat template)
  train_state   JsonSave of trainer bookkeeping: step, data iterator state, rng, counters (optional)

Saves are atomic (orbax writes a tmp dir and renames it). Restores land on whatever mesh the
caller's abstract targets name, or on one device without targets.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sft_jax.models.family import ModelConfig, config_from_dict, config_to_dict
from sft_jax.runtime.paths import as_path, is_remote

PYTREE_ITEMS = ("params", "opt_state")
JSON_ITEMS = ("model_config", "tokenizer", "train_state")
ITEMS = PYTREE_ITEMS + JSON_ITEMS


class CheckpointError(ValueError):
    """A path that is not a usable sft_jax checkpoint."""


def _handlers() -> dict:
    return {**{name: ocp.StandardCheckpointHandler() for name in PYTREE_ITEMS},
            **{name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS}}


def _serial_writes_on_cpu() -> None:
    """On CPU devices, each array is written by one replica (orbax's replica-parallel writes off).

    Replica-parallel saving slices every device's copy of a replicated array with an eager op,
    which XLA compiles once per device and shape: with a mesh of host CPU devices (tests,
    trials) that is ~0.1 s x parameters x devices at the first save, for nothing (one host, one
    disk). Orbax already turns it off on GPUs; TPUs keep its default."""
    if jax.default_backend() != "cpu":
        return
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if isinstance(handler, ocp.type_handlers.ArrayHandler) and getattr(handler, "_use_replica_parallel", False):
        # orbax warns through absl at every deliberate override; this one is expected, so that
        # one line is dropped (and only while registering)
        overriding = _DropLogRecords('Type handler registry type "', "overriding")
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(overriding)
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
        finally:
            absl_logger.removeFilter(overriding)


class _DropLogRecords(logging.Filter):
    """Drops the log records whose message starts with ``prefix`` and contains ``word``."""

    def __init__(self, prefix: str, word: str):
        super().__init__()
        self.prefix, self.word = prefix, word

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.prefix) and self.word in message)


def make_manager(directory, *, keep: int | None = None, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
    """A manager over ``directory`` with this layout's items registered; ``keep`` = max_to_keep."""
    _serial_writes_on_cpu()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=async_save)
    root = str(directory) if is_remote(directory) else os.path.abspath(as_path(directory))
    return ocp.CheckpointManager(root, options=options, item_handlers=_handlers())


# --- tokenizer <-> {filename: text} -------------------------------------------

def tokenizer_to_files(tokenizer) -> dict[str, str]:
    """``save_pretrained`` into a temp dir and read every file back as text."""
    if isinstance(tokenizer, dict):
        return dict(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                try:
                    files[str(path.relative_to(tmp))] = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise CheckpointError(f"tokenizer file {path.name} is not text; only text tokenizers "
                                          f"(GPT-2 byte-level BPE) can be stored in a checkpoint") from e
        return files


def write_tokenizer_files(files: dict[str, str], directory) -> None:
    for name, text in files.items():
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def tokenizer_from_files(files: dict[str, str] | None):
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(files, tmp)
        return AutoTokenizer.from_pretrained(tmp)


# --- save / restore -----------------------------------------------------------

def save(manager: ocp.CheckpointManager, step: int, *, params, model_config: ModelConfig | dict,
         tokenizer=None, opt_state=None, train_state: dict | None = None, force: bool = False) -> bool:
    """Save one step (async if the manager is); returns whether orbax saved it.

    Callers that exit or read the checkpoint right after must ``manager.wait_until_finished()``.
    """
    cfg_dict = dict(model_config) if isinstance(model_config, dict) else config_to_dict(model_config)
    items: dict[str, Any] = {"params": ocp.args.StandardSave(params),
                             "model_config": ocp.args.JsonSave(cfg_dict)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if tokenizer is not None:
        items["tokenizer"] = ocp.args.JsonSave(tokenizer_to_files(tokenizer))
    if train_state is not None:
        items["train_state"] = ocp.args.JsonSave(dict(train_state))
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _step_dirs(root: Path) -> dict[int, Path]:
    steps = {}
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and child.name.isdigit() and (child / "model_config").is_dir():
                steps[int(child.name)] = child
    return steps


def is_step_dir(path) -> bool:
    path = as_path(path)
    return (path / "model_config").is_dir() and (path / "params").is_dir()


def is_checkpoint(path) -> bool:
    """True for a manager root holding at least one finished step, or a step dir."""
    path = as_path(path)
    return is_step_dir(path) or bool(_step_dirs(path))


def latest_step(directory) -> int | None:
    """The newest finished step under a manager root (orbax tmp dirs are not counted)."""
    steps = _step_dirs(as_path(directory))
    return max(steps) if steps else None


def _resolve_step_dir(path, step: int | None) -> tuple[Path, int | None]:
    path = as_path(path)
    if not is_remote(path):
        path = path.absolute()  # orbax refuses relative paths ("Checkpoint path should be absolute")
    if is_step_dir(path):
        if step is not None:
            raise CheckpointError(f"{path} is already a step dir; do not also pass step={step}")
        return path, int(path.name) if path.name.isdigit() else None
    steps = _step_dirs(path)
    if not steps:
        raise CheckpointError(f"{path} is not an sft_jax orbax checkpoint (no step dirs with "
                              f"'params' and 'model_config')")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"{path} has no step {step}; steps: {sorted(steps)}")
    return steps[step], step


def _single_device_target(step_dir: Path, item: str):
    """Abstract target from the saved metadata, placed on the first local device."""
    handler = ocp.StandardCheckpointHandler()
    meta = handler.metadata(step_dir / item)
    meta = getattr(meta, "tree", meta)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)


def restore(path, step: int | None = None, *, params_target=None, opt_state_target=None,
            with_opt_state: bool = False, with_tokenizer: bool = True) -> dict:
    """Restore a checkpoint; ``path`` is a manager root (newest step unless ``step``) or a step dir.

    Targets are abstract pytrees (``jax.ShapeDtypeStruct`` with ``.sharding``), so arrays land
    sharded on any mesh; without a target they land whole on the first local device.
    Returns {params, opt_state, model_config (its family's config), tokenizer, train_state, step};
    ``with_tokenizer=False`` leaves tokenizer None (building it imports transformers' AutoTokenizer
    and with it torch: seconds a caller that needs only the weights can skip).
    """
    step_dir, step = _resolve_step_dir(path, step)
    present = {name for name in ITEMS if (step_dir / name).is_dir()}
    want_opt = with_opt_state or opt_state_target is not None
    if want_opt and "opt_state" not in present:
        raise CheckpointError(f"{step_dir} has no opt_state item")
    if params_target is None:
        params_target = _single_device_target(step_dir, "params")
    items = {"params": ocp.args.StandardRestore(params_target),
             "model_config": ocp.args.JsonRestore()}
    if want_opt:
        target = opt_state_target if opt_state_target is not None else _single_device_target(step_dir, "opt_state")
        items["opt_state"] = ocp.args.StandardRestore(target)
    for name in ("tokenizer", "train_state"):
        if name in present and (with_tokenizer or name != "tokenizer"):
            items[name] = ocp.args.JsonRestore()
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers()))
    try:
        out = checkpointer.restore(step_dir, args=ocp.args.Composite(**items))
    finally:
        checkpointer.close()
    return {
        "params": out["params"],
        "opt_state": out["opt_state"] if want_opt else None,
        "model_config": config_from_dict(out["model_config"]),
        "tokenizer": tokenizer_from_files(out["tokenizer"] if "tokenizer" in out else None),
        "train_state": out["train_state"] if "train_state" in present else None,
        "step": step,
    }


def load_model(path, **config_overrides):
    """(model config, params, tokenizer | None) from an HF dir, a hub name, or an orbax checkpoint
    (root or step dir). ``config_overrides`` set compute fields (dtype, remat, ...)."""
    from sft_jax.models import hf_io as hf  # imports nothing from here; lazy to keep checkpoint import light

    p = as_path(path)
    if p.is_dir() and is_checkpoint(p):
        out = restore(p)
        cfg = out["model_config"].replace(**config_overrides) if config_overrides else out["model_config"]
        return cfg, out["params"], out["tokenizer"]
    if p.is_dir() and not (p / "config.json").is_file():
        raise CheckpointError(f"{p} is neither an orbax checkpoint nor an HF model dir (no config.json)")
    cfg, params = hf.load_hf(path, **config_overrides)
    return cfg, params, hf.load_tokenizer(path)
