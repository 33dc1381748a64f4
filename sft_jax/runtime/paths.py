"""Where a run's files live: local paths, and object stores (gs://, s3://) through orbax's
path layer, with the local staging directory a remote run writes its logs, report and
export to before they are copied up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sft_jax.config import Config

LOCK_NAME = "run.lock"  # the run lock's file (sft_jax.runtime.runlock); never uploaded

REMOTE_SCHEMES = ("gs://", "s3://")  # object stores orbax writes to through etils.epath


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def as_path(path):
    """A local ``pathlib.Path`` (``~`` expanded), or an ``etils.epath.Path`` for gs:// and
    other object stores (orbax's own path layer; pathlib would fold "gs://" into "gs:/")."""
    if is_remote(path):
        from etils import epath

        return epath.Path(str(path))
    return Path(os.path.expanduser(os.fspath(path)))


def run_dirs(config: Config):
    """(local directory for logs, report and export; checkpoint root, local or remote).

    Object stores have no append and no atomic directory rename, which metrics.jsonl and
    the self-verifying export rely on; so with a gs:// output_dir those files are written to
    a local staging directory and copied up (``upload_outputs``), while orbax writes the
    checkpoints to the bucket directly from every process."""
    out = config.run.output_dir
    if not is_remote(out):
        return Path(out), Path(out) / "checkpoints"
    name = out.split("://", 1)[1].strip("/").replace("/", "__")
    return Path(config.run.staging_dir).expanduser() / name, as_path(out) / "checkpoints"


def upload_outputs(local: Path, remote) -> None:
    """Copy every file under ``local`` to the same place under ``remote`` (overwriting)."""
    from etils import epath

    remote = epath.Path(remote)
    for src in sorted(local.rglob("*")):
        if src.is_file() and src.relative_to(local).as_posix() != LOCK_NAME:  # the bucket has its lease
            dst = remote / src.relative_to(local).as_posix()
            dst.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(src).copy(dst, overwrite=True)


def download_outputs(remote, local: Path, names=("metrics.jsonl",)) -> None:
    """On a resume from a fresh machine, bring back the files a run appends to."""
    from etils import epath

    for name in names:
        src = epath.Path(remote) / name
        if src.exists() and not (local / name).exists():
            local.mkdir(parents=True, exist_ok=True)
            src.copy(epath.Path(local / name))
