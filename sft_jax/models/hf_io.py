"""Hugging Face <-> sft_jax parameters for every family: import (optionally sharded) and verified export.

A family states its checkpoint layout as a ``KeyMap`` beside its weights (GPT-2's in
``sft_jax.models.gpt2.hf``); this module reads and writes any of them. Import reads only the
slices each device needs from safetensors (memory-mapped), so a full-size tensor is never whole
on one device. Export writes a directory that ``transformers`` loads offline, verified (logits
of the reloaded files, then transformers' own) before it is moved into place. ``config.json``'s
``model_type`` picks the family (``sft_jax.models.family``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sft_jax.models.family import Family, ModelConfig, family_of, get_family, stop_token_ids, with_stop_token_ids


class HFFormatError(ValueError):
    """A source that is not a readable checkpoint of a supported family, or an export that failed its checks."""


# --- the mapping ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KeyMap:
    """How a family's parameters sit in an HF checkpoint.

    Each row of ``global_layout`` and ``layer_layout`` is (HF key, our path, HF shape, our shape);
    shapes are tuples of sizes or comma-separated terms of axis letters that ``sizes(cfg)`` gives,
    each optionally with an integer factor ("D", "3D", "HK"), and each HF axis (of the tensor's
    transpose for ``transposed`` paths) maps onto one or more consecutive axes of ours. Layer rows
    name layer i's tensor ``layer_key.format(i=i) + key`` and our leaf ``stack/path`` with a
    leading L axis."""

    prefix: str  # stripped from HF keys when present on read, written before every key on export
    global_layout: tuple[tuple[str, str, Any, Any], ...]
    layer_layout: tuple[tuple[str, str, Any, Any], ...]
    layer_key: str  # HF key prefix of layer i's tensors, e.g. "h.{i}."
    stack: str  # our subtree holding the scanned layers
    sizes: Callable[[Any], dict[str, int]] = lambda cfg: {}  # axis letter -> size, for a config
    ignored: re.Pattern = re.compile(r"$^")  # HF keys (searched) that are not weights (buffers, a tied head)
    vocab_axes: tuple[tuple[str, int], ...] = ()  # (our path, axis) padded to padded_vocab_size rows
    transposed: frozenset = frozenset()  # our paths whose HF tensor is stored (out, in): read as its transpose


def _dims(spec: str | tuple[int, ...], size: dict[str, int]) -> tuple[int, ...]:
    if isinstance(spec, tuple):  # given as numbers
        return spec
    out = []
    for term in spec.split(","):
        digits = len(term) - len(term.lstrip("0123456789"))
        n = int(term[:digits]) if digits else 1
        for letter in term[digits:]:
            n *= size[letter]
        out.append(n)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One of our leaves and where its data sits in the HF checkpoint."""

    path: tuple[str, ...]  # under params['params']
    hf_keys: tuple[str, ...]  # one per layer for stacked leaves, else one
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # our per-layer shape (a vocab axis at its real size, padding added on read)
    stacked: bool
    vocab_axis: int | None = None  # our axis padded to padded_vocab_size
    transpose: bool = False  # the HF tensor is our layout's transpose

    @property
    def hf_view(self) -> tuple[int, ...]:
        """The HF tensor's shape as read: transposed if stored (out, in)."""
        return self.hf_shape[::-1] if self.transpose else self.hf_shape

    @property
    def groups(self) -> list[list[int]]:
        """For each axis of ``hf_view``, the axes of ours it splits into."""
        groups, j = [], 0
        for n in self.hf_view:
            group, prod = [], 1
            while prod < n or (not group):
                group.append(j)
                prod *= self.shape[j]
                j += 1
            groups.append(group)
        return groups


def tensor_layout(cfg: ModelConfig, keys: KeyMap) -> list[HFTensor]:
    """Every leaf of the family's parameter tree with the HF tensors it is read from."""
    size = keys.sizes(cfg)
    vocab_axes = dict(keys.vocab_axes)
    out = []
    for k, p, hs, s in keys.global_layout:
        out.append(HFTensor(tuple(p.split("/")), (k,), _dims(hs, size), _dims(s, size), False,
                           vocab_axes.get(p), p in keys.transposed))
    for k, p, hs, s in keys.layer_layout:
        hf_keys = tuple(keys.layer_key.format(i=i) + k for i in range(cfg.num_hidden_layers))
        out.append(HFTensor((keys.stack,) + tuple(p.split("/")), hf_keys, _dims(hs, size), _dims(s, size), True,
                           vocab_axes.get(p), p in keys.transposed))
    return out


def _global_shape(t: HFTensor, cfg: ModelConfig) -> tuple[int, ...]:
    shape = t.shape
    if t.vocab_axis is not None:
        shape = shape[:t.vocab_axis] + (cfg.padded_vocab_size,) + shape[t.vocab_axis + 1:]
    return ((cfg.num_hidden_layers,) + shape) if t.stacked else shape


# --- reading tensors -----------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _SafetensorsFile:
    """A memory-mapped safetensors file: reading a slice touches only those bytes.

    We parse the (simple) header ourselves because safetensors' numpy reader has no bfloat16.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
            self.entries = {}
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = np.dtype(_ST_DTYPES[info["dtype"]])
                shape = tuple(info["shape"])
                begin, end = info["data_offsets"]
                if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                    raise ValueError(f"tensor {key!r} has data offsets {begin}..{end} that do not fit its "
                                     f"shape {shape} {info['dtype']} or the file ({size} bytes); truncated?")
                self.entries[key] = (dtype, shape, 8 + n + begin)
            self.mmap = np.memmap(path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise HFFormatError(f"{path}: not a readable safetensors file ({e})") from e

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        dtype, shape, start = self.entries[key]
        data = self.mmap[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        return np.asarray(data[index], dtype=np.float32)


class _TorchFile:
    """pytorch_model.bin, loaded whole (torch pickles cannot be sliced) with weights_only=True."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as e:
            raise HFFormatError(f"{path}: reading pytorch_model.bin needs torch ({e}); "
                                f"install torch or convert the weights to model.safetensors") from e
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds for a corrupt pickle/zip
            raise HFFormatError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
        self.arrays = {k: v.detach().to(torch.float32).numpy() for k, v in state.items() if hasattr(v, "detach")}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.arrays[key].shape)

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.arrays[key][index], dtype=np.float32)


class _Checkpoint:
    """All weight files of an HF model dir, with keys normalised (``prefix`` removed where present)."""

    def __init__(self, directory: Path, prefix: str = ""):
        index_file = directory / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise HFFormatError(f"{index_file}: not a safetensors index ({e})") from e
            files = {name: _SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
        elif (directory / "model.safetensors").is_file():
            files = {"model.safetensors": _SafetensorsFile(directory / "model.safetensors")}
        elif (directory / "pytorch_model.bin").is_file():
            files = {"pytorch_model.bin": _TorchFile(directory / "pytorch_model.bin")}
        else:
            raise HFFormatError(f"{directory}: no model.safetensors, model.safetensors.index.json "
                                f"or pytorch_model.bin")
        self.where: dict[str, tuple[Any, str]] = {}  # normalised key -> (file, raw key)
        for f in files.values():
            raw_keys = f.entries if isinstance(f, _SafetensorsFile) else f.arrays
            for raw in raw_keys:
                self.where[raw.removeprefix(prefix)] = (f, raw)

    def check(self, layout: list[HFTensor], family: Family, keys: KeyMap, extra_keys=()) -> None:
        """Every tensor present with its HF shape and nothing unknown (besides ``extra_keys``); else one clear error."""
        expected = {}
        for t in layout:
            for k in t.hf_keys:
                expected[k] = t.hf_shape
        for key, shape in expected.items():
            if key not in self.where:
                raise HFFormatError(f"{self._files()}: missing tensor {key!r} (expected shape {shape})")
            f, raw = self.where[key]
            if f.shape(raw) != shape:
                raise HFFormatError(f"{f.path}: tensor {raw!r} has shape {f.shape(raw)}, expected {shape}")
        unknown = sorted(k for k in self.where
                         if k not in expected and k not in extra_keys and not keys.ignored.search(k))
        if unknown:
            raise HFFormatError(f"{self._files()}: unexpected tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''}; "
                                f"not a plain {family.name} LM checkpoint")

    def _files(self) -> str:
        return ", ".join(sorted({str(f.path) for f, _ in self.where.values()})) or "weights"

    def read(self, t: HFTensor, index: tuple[slice, ...], global_shape: tuple[int, ...]) -> np.ndarray:
        """The block ``index`` of our (global) array for tensor ``t``."""
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, global_shape))
        if t.stacked:
            layers = range(index[0].start, index[0].stop, index[0].step)
            return np.stack([self._read_one(t, t.hf_keys[i], index[1:]) for i in layers])
        return self._read_one(t, t.hf_keys[0], index)

    def _read_one(self, t: HFTensor, key: str, index: tuple[slice, ...]) -> np.ndarray:
        a = t.vocab_axis
        if a is not None:  # entries past the real vocab are padding: zeros
            want, n = index[a], t.shape[a]
            real = slice(min(want.start, n), min(want.stop, n), 1)
            block = self._read_block(t, key, index[:a] + (real,) + index[a + 1:])
            pad_shape = list(block.shape)
            pad_shape[a] = want.stop - want.start - block.shape[a]
            return np.concatenate([block, np.zeros(pad_shape, np.float32)], axis=a)
        return self._read_block(t, key, index)

    def _read_block(self, t: HFTensor, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Read a contiguous range on each HF axis where the split allows it (the inner axes of
        its group are whole), else the whole axis; reshape to our axes; slice what is left."""
        f, raw = self.where[key]
        hf_index, rest = [], list(index)
        for group in t.groups:
            first = index[group[0]]
            if all(index[j] == slice(0, t.shape[j], 1) for j in group[1:]):
                stride = math.prod(t.shape[j] for j in group[1:])
                hf_index.append(slice(first.start * stride, first.stop * stride))
                rest[group[0]] = slice(None)
            else:
                hf_index.append(slice(None))
        try:
            block = f.read(raw, tuple(hf_index[::-1]) if t.transpose else tuple(hf_index))
        except Exception as e:
            raise HFFormatError(f"{f.path}: cannot read tensor {raw!r} ({type(e).__name__}: {e})") from e
        if t.transpose:
            block = block.T
        block_shape = [s.stop - s.start if r == slice(None) else n for s, r, n in zip(index, rest, t.shape)]
        return block.reshape(block_shape)[tuple(rest)]


# --- import ----------------------------------------------------------------------

HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"]


@functools.lru_cache(maxsize=16)
def resolve_dir(path_or_name: str) -> Path:
    """A local dir as is; otherwise a hub name, fetched once (safetensors, else pytorch_model.bin)."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_name).startswith((".", "/", "~")) or str(path_or_name).count("/") > 1:
        raise HFFormatError(f"{path_or_name}: no such model directory")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(path_or_name, allow_patterns=HUB_PATTERNS + ["*.safetensors", "model.safetensors.index.json"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(path_or_name, allow_patterns=HUB_PATTERNS + ["pytorch_model.bin"]))
    except Exception as e:
        raise HFFormatError(f"{path_or_name}: not a local directory and not fetchable from the hub "
                            f"({type(e).__name__}: {e})") from e
    return local


def read_hf_config(directory: Path) -> dict:
    """The dir's ``config.json`` as a dict."""
    config_file = directory / "config.json"
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise HFFormatError(f"{config_file}: cannot read an HF config ({e})") from e


def read_config(directory: Path, **compute_overrides) -> ModelConfig:
    """The model config of an HF dir, of the family its ``model_type`` names."""
    config_file = directory / "config.json"
    hf_config = read_hf_config(directory)
    try:
        family = get_family(hf_config.get("model_type"))
    except ValueError as e:
        raise HFFormatError(f"{config_file}: {e}") from e
    try:
        cfg = family.config_cls.from_hf_config(hf_config, **compute_overrides)
    except (ValueError, KeyError, TypeError) as e:
        raise HFFormatError(f"{config_file}: not a supported {hf_config['model_type']!r} config "
                            f"({type(e).__name__}: {e})") from e
    generation_file = directory / "generation_config.json"
    try:
        return with_stop_token_ids(cfg, generation_eos_ids(directory))
    except ValueError as e:
        raise HFFormatError(f"{generation_file}: {e}") from e


def generation_eos_ids(directory: Path) -> list[int]:
    """The ids ``generation_config.json`` stops generation at (its ``eos_token_id``, an id or a
    list); none when the dir has no such file. transformers' generate stops at these, so we do too."""
    generation_file = directory / "generation_config.json"
    if not generation_file.is_file():
        return []
    try:
        eos = json.loads(generation_file.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise HFFormatError(f"{generation_file}: cannot read a generation config ({e})") from e
    ids = eos if isinstance(eos, list) else [eos]
    if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
        raise HFFormatError(f"{generation_file}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return [i for i in ids if i is not None]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _sharding_leaf(x):
    return getattr(x, "sharding", x)


def load_hf(path_or_name, *, shardings=None, extra_keys=(), **compute_overrides) -> tuple[ModelConfig, dict]:
    """(model config, params) from an HF dir or hub name of any supported family.

    ``shardings`` is a pytree of ``jax.sharding.Sharding`` (or abstract arrays carrying one)
    matching the params; each device then reads only its own slice. ``compute_overrides`` set
    compute fields of the config (dtype, remat, scan_layers, attention). ``extra_keys``: tensors
    besides the trunk's that the dir may hold and the caller reads itself (a reward head).
    """
    directory = resolve_dir(str(path_or_name))
    cfg = read_config(directory, **compute_overrides)
    family = family_of(cfg)
    keys = family.key_map(cfg)
    source = _Checkpoint(directory, keys.prefix)
    layout = tensor_layout(cfg, keys)
    source.check(layout, family, keys, extra_keys)
    flat_shardings = None
    if shardings is not None:
        flat_shardings = {}
        inner = shardings["params"] if "params" in shardings else shardings
        for t in layout:
            node = inner
            for p in t.path:
                node = node[p]
            flat_shardings[t.path] = _sharding_leaf(node)
    params: dict = {}
    for t in layout:
        shape = _global_shape(t, cfg)
        full = tuple(slice(0, n) for n in shape)
        if flat_shardings is None:
            value = jnp.asarray(source.read(t, full, shape))
        else:
            value = jax.make_array_from_callback(shape, flat_shardings[t.path],
                                                 lambda index, t=t, shape=shape: source.read(t, index, shape))
        _set(params, t.path, value)
    return cfg, {"params": params}


def load_tokenizer(path_or_name):
    """The dir's tokenizer via ``AutoTokenizer``, or None if it has no tokenizer files."""
    directory = resolve_dir(str(path_or_name))
    if not any((directory / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


# --- export ----------------------------------------------------------------------

def to_hf_state_dict(params, cfg: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Host numpy arrays under the keys of the family's HF causal-LM class (a tied head left out)."""
    return _state_dict(params, cfg, family_of(cfg).key_map(cfg), dtype)


def _state_dict(params, cfg: ModelConfig, keys: KeyMap, dtype: str) -> dict[str, np.ndarray]:
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    inner = params["params"] if "params" in params else params
    out = {}
    for t in tensor_layout(cfg, keys):
        node = inner
        for p in t.path:
            node = node[p]
        value = np.asarray(jax.device_get(node), dtype=np.float32)
        if value.shape != _global_shape(t, cfg):
            raise HFFormatError(f"param {'/'.join(t.path)} has shape {value.shape}, expected {_global_shape(t, cfg)}")
        if t.vocab_axis is not None:  # padding entries are not exported
            a = t.vocab_axis + t.stacked
            value = value[(slice(None),) * a + (slice(0, cfg.vocab_size),)]
        layers = list(value) if t.stacked else [value]
        for key, v in zip(t.hf_keys, layers):
            v = v.reshape(t.hf_view)
            out[keys.prefix + key] = np.ascontiguousarray(v.T if t.transpose else v).astype(np_dtype)
    return out


def write_safetensors(tensors: dict[str, np.ndarray], path) -> None:
    from safetensors.numpy import save_file  # takes ml_dtypes bfloat16 arrays as BF16

    save_file(tensors, str(path), metadata={"format": "pt"})


@dataclasses.dataclass
class ExportReport:
    out_dir: str
    dtype: str
    checks: list[str]  # what was verified, with the measured differences
    max_abs_diff: dict[str, float]


VERIFY_PROMPTS = 2, 16  # batch, length of the fixed verification prompts
HF_ATOL = 1e-4  # transformers (torch float32) vs JAX float32 logits
BF16_REL_TOL = 2.0 ** -4  # bf16-rounded vs float32 logits, relative to the largest |logit|


def verify_tokens(cfg: ModelConfig) -> np.ndarray:
    """The fixed (B, T) prompts on which an export's logits are compared."""
    B, T = VERIFY_PROMPTS
    T = min(T, cfg.max_position_embeddings)
    return (np.arange(B * T).reshape(B, T) * 7919 + 13) % cfg.vocab_size


@functools.partial(jax.jit, static_argnums=0)
def logits_of(cfg: ModelConfig, params, tokens):
    """The model's logits for whole (B, T) rows of ``tokens`` (one document each), jitted."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    return family_of(cfg).module(cfg).apply(params, tokens, positions, jnp.ones_like(tokens))


def _host_params(params) -> dict:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)


def staging_dir(out_dir, overwrite: bool) -> tuple[Path, Path]:
    """(out, tmp): the absolute export path, refused if it holds files and not ``overwrite``, and a fresh
    temporary dir beside it to write and verify in."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HFFormatError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the verified ``tmp`` (renames on one filesystem)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "dir")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def export_hf(params, cfg: ModelConfig, out_dir, *, tokenizer=None, chat_template: str | None = None,
              dtype: str = "float32", verify: bool = True, overwrite: bool = False) -> ExportReport:
    """Write an HF causal-LM dir of the config's family (config, safetensors, generation config,
    tokenizer), verify it, then move it into place. On any failure nothing is left at ``out_dir``."""
    if dtype not in ("float32", "bfloat16"):
        raise HFFormatError(f"export dtype {dtype!r}: choose float32 or bfloat16")
    if chat_template is not None and tokenizer is None:
        raise HFFormatError("chat_template needs a tokenizer to attach to")
    out, tmp = staging_dir(out_dir, overwrite)
    try:
        cfg32 = cfg.replace(dtype="float32")
        host = _host_params(params)
        write_safetensors(to_hf_state_dict(host, cfg, dtype), tmp / "model.safetensors")
        hf_config = cfg.to_hf_config()
        hf_config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        stops = list(stop_token_ids(cfg))  # transformers' generate stops at any of them, as we do
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                      "pad_token_id": cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            if chat_template is not None:
                tokenizer.chat_template = chat_template
            tokenizer.save_pretrained(str(tmp))
        report = ExportReport(str(out), dtype, [], {})
        if verify:
            _verify(host, cfg32, tmp, dtype, tokenizer, report)
        move_into_place(tmp, out)
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _verify(host: dict, cfg32: ModelConfig, tmp: Path, dtype: str, tokenizer, report: ExportReport) -> None:
    """Reload what was written and compare logits: JAX reload, then transformers if importable.

    JAX's logits are computed with full float32 matmuls: on GPUs the default precision for
    float32 is TF32 (10-bit mantissa), which alone differs from PyTorch's CPU float32 by ~1e-3."""
    _, reloaded = load_hf(tmp, dtype="float32")
    tokens = jnp.asarray(verify_tokens(cfg32), jnp.int32)
    V = cfg32.vocab_size
    with jax.default_matmul_precision("highest"):
        got = np.asarray(logits_of(cfg32, reloaded, tokens))[..., :V]
        want = np.asarray(logits_of(cfg32, jax.tree.map(jnp.asarray, host), tokens))[..., :V]
    diff = float(np.max(np.abs(got - want)))
    report.max_abs_diff["jax_reload"] = diff
    if dtype == "float32":
        if diff != 0.0:
            raise HFFormatError(f"export verification failed: reloaded float32 logits differ from the "
                                f"model's (max abs diff {diff:.3g}, must be exactly 0)")
        report.checks.append("jax reload: float32 logits bit-identical")
    else:
        tol = BF16_REL_TOL * max(1.0, float(np.max(np.abs(want))))
        if not diff <= tol:
            raise HFFormatError(f"export verification failed: bfloat16 logits differ from float32 by "
                                f"{diff:.3g} > {tol:.3g} (2^-4 of the largest |logit|)")
        report.checks.append(f"jax reload: bfloat16 logits within {diff:.3g} of float32 (tol {tol:.3g})")
    try:
        import torch
        import transformers
    except ImportError:
        report.checks.append("transformers logits: skipped (torch not importable)")
        return
    causal_lm_class = family_of(cfg32).causal_lm_classes[cfg32.model_type]
    model = getattr(transformers, causal_lm_class).from_pretrained(str(tmp), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        hf_logits = model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    diff = float(np.max(np.abs(hf_logits[..., :V] - got)))
    report.max_abs_diff["transformers"] = diff
    if not diff <= HF_ATOL:
        raise HFFormatError(f"export verification failed: transformers logits differ from JAX by "
                            f"{diff:.3g} > {HF_ATOL:g}")
    report.checks.append(f"transformers float32 logits within {diff:.3g} of JAX (tol {HF_ATOL:g})")
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tmp))
        report.checks.append("AutoTokenizer loads")
