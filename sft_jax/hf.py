"""Hugging Face GPT-2 <-> sft_jax parameters: import (optionally sharded) and verified export.

The key mapping lives in ``LAYOUT`` below, beside the quirks it handles. Import reads only the
slices each device needs from safetensors (memory-mapped), so a full-size tensor is never whole
on one device. Export writes a directory that ``transformers`` loads offline, verified before it
is moved into place.
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
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sft_jax.model import GPT2, GPT2Config


class HFFormatError(ValueError):
    """A source that is not a readable GPT-2 checkpoint, or an export that failed its checks."""


# --- the mapping ---------------------------------------------------------------
# HF GPT2LMHeadModel quirks, all handled here:
#  * Conv1D stores weights as (in, out), the same orientation as our kernels: reshape, never transpose.
#  * c_attn is one (D, 3D) matrix with q|k|v side by side; we view it as (D, 3, H, K).
#  * lm_head.weight is tied to wte (often absent from the file); it is never read or written.
#  * attn.bias / attn.masked_bias are causal-mask buffers in old checkpoints, not weights: ignored.
#  * GPT2Model checkpoints lack the "transformer." key prefix.
#  * Our wte has padded_vocab_size rows: padding rows are zero on import and trimmed on export.
#  * Per-layer tensors h.{i}.* are stacked on a leading L axis (scanned layers).
# Shapes are written in axis letters (D embed, H heads, K head dim, F = 4D, V vocab, P positions);
# "3D" means 3 * D. Each HF axis maps onto one or more consecutive axes of ours.
#   HF key (after "transformer.")   our path                  HF shape    our shape (per layer)
GLOBAL_LAYOUT = [
    ("wte.weight",                  "wte",                    "V,D",      "V,D"),
    ("wpe.weight",                  "wpe",                    "P,D",      "P,D"),
    ("ln_f.weight",                 "ln_f/scale",             "D",        "D"),
    ("ln_f.bias",                   "ln_f/bias",              "D",        "D"),
]
LAYER_LAYOUT = [  # HF key h.{i}.<suffix>, ours h/<path> with a leading L axis
    ("ln_1.weight",                 "ln_1/scale",             "D",        "D"),
    ("ln_1.bias",                   "ln_1/bias",              "D",        "D"),
    ("attn.c_attn.weight",          "attn/c_attn_kernel",     "D,3D",     "D,3,H,K"),
    ("attn.c_attn.bias",            "attn/c_attn_bias",       "3D",       "3,H,K"),
    ("attn.c_proj.weight",          "attn/c_proj_kernel",     "D,D",      "H,K,D"),
    ("attn.c_proj.bias",            "attn/c_proj_bias",       "D",        "D"),
    ("ln_2.weight",                 "ln_2/scale",             "D",        "D"),
    ("ln_2.bias",                   "ln_2/bias",              "D",        "D"),
    ("mlp.c_fc.weight",             "mlp/c_fc_kernel",        "D,F",      "D,F"),
    ("mlp.c_fc.bias",               "mlp/c_fc_bias",          "F",        "F"),
    ("mlp.c_proj.weight",           "mlp/c_proj_kernel",      "F,D",      "F,D"),
    ("mlp.c_proj.bias",             "mlp/c_proj_bias",        "D",        "D"),
]
IGNORED_KEYS = re.compile(r"^(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$")


def _dims(spec: str, cfg: GPT2Config) -> tuple[int, ...]:
    size = {"D": cfg.n_embd, "H": cfg.n_head, "K": cfg.head_dim, "F": 4 * cfg.n_embd,
            "V": cfg.vocab_size, "P": cfg.n_positions}
    out = []
    for term in spec.split(","):
        factor, letter = (int(term[:-1]), term[-1]) if len(term) > 1 else (1, term)
        out.append(factor * size[letter] if letter in size else int(term))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One of our leaves and where its data sits in the HF checkpoint."""

    path: tuple[str, ...]  # under params['params']
    hf_keys: tuple[str, ...]  # one per layer for stacked leaves, else one
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # our per-layer shape (wte: real vocab rows, padding added on read)
    stacked: bool

    @property
    def groups(self) -> list[list[int]]:
        """For each HF axis, the axes of ours it splits into."""
        groups, j = [], 0
        for n in self.hf_shape:
            group, prod = [], 1
            while prod < n or (not group):
                group.append(j)
                prod *= self.shape[j]
                j += 1
            groups.append(group)
        return groups


def _layout(cfg: GPT2Config) -> list[_Tensor]:
    out = [_Tensor(tuple(p.split("/")), (k,), _dims(hs, cfg), _dims(s, cfg), False) for k, p, hs, s in GLOBAL_LAYOUT]
    out += [_Tensor(("h",) + tuple(p.split("/")), tuple(f"h.{i}.{k}" for i in range(cfg.n_layer)),
                    _dims(hs, cfg), _dims(s, cfg), True) for k, p, hs, s in LAYER_LAYOUT]
    return out


def _global_shape(t: _Tensor, cfg: GPT2Config) -> tuple[int, ...]:
    shape = ((cfg.padded_vocab_size,) + t.shape[1:]) if t.path == ("wte",) else t.shape
    return ((cfg.n_layer,) + shape) if t.stacked else shape


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
    """All weight files of an HF model dir, with keys normalised (no "transformer." prefix)."""

    def __init__(self, directory: Path):
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
                self.where[raw.removeprefix("transformer.")] = (f, raw)

    def check(self, layout: list[_Tensor], extra_keys=()) -> None:
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
                         if k not in expected and k not in extra_keys and not IGNORED_KEYS.match(k))
        if unknown:
            raise HFFormatError(f"{self._files()}: unexpected tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''}; "
                                f"not a plain GPT-2 LM checkpoint")

    def _files(self) -> str:
        return ", ".join(sorted({str(f.path) for f, _ in self.where.values()})) or "weights"

    def read(self, t: _Tensor, index: tuple[slice, ...], global_shape: tuple[int, ...]) -> np.ndarray:
        """The block ``index`` of our (global) array for tensor ``t``."""
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, global_shape))
        if t.stacked:
            layers = range(index[0].start, index[0].stop, index[0].step)
            return np.stack([self._read_one(t, t.hf_keys[i], index[1:]) for i in layers])
        return self._read_one(t, t.hf_keys[0], index)

    def _read_one(self, t: _Tensor, key: str, index: tuple[slice, ...]) -> np.ndarray:
        if t.path == ("wte",):  # rows past the real vocab are padding: zeros
            rows, cols = index
            real = slice(min(rows.start, t.shape[0]), min(rows.stop, t.shape[0]), 1)
            block = self._read_block(t, key, (real, cols))
            pad = np.zeros((rows.stop - rows.start - block.shape[0], block.shape[1]), np.float32)
            return np.concatenate([block, pad])
        return self._read_block(t, key, index)

    def _read_block(self, t: _Tensor, key: str, index: tuple[slice, ...]) -> np.ndarray:
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
            block = f.read(raw, tuple(hf_index))
        except Exception as e:
            raise HFFormatError(f"{f.path}: cannot read tensor {raw!r} ({type(e).__name__}: {e})") from e
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


def read_config(directory: Path, **compute_overrides) -> GPT2Config:
    config_file = directory / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise HFFormatError(f"{config_file}: cannot read an HF config ({e})") from e
    try:
        cfg = GPT2Config.from_hf_config(hf_config, **compute_overrides)
    except (ValueError, KeyError, TypeError) as e:
        raise HFFormatError(f"{config_file}: not a supported GPT-2 config ({type(e).__name__}: {e})") from e
    if hf_config.get("tie_word_embeddings") is False:
        raise HFFormatError(f"{config_file}: tie_word_embeddings=false (an untied lm_head) is not supported")
    return cfg


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _sharding_leaf(x):
    return getattr(x, "sharding", x)


def load_hf(path_or_name, *, shardings=None, extra_keys=(), **compute_overrides) -> tuple[GPT2Config, dict]:
    """(GPT2Config, params) from an HF GPT-2 dir or hub name.

    ``shardings`` is a pytree of ``jax.sharding.Sharding`` (or abstract arrays carrying one)
    matching the params; each device then reads only its own slice. ``compute_overrides`` set
    compute fields of the config (dtype, remat, scan_layers, attention). ``extra_keys``: tensors
    besides the trunk's that the dir may hold and the caller reads itself (a reward head).
    """
    directory = resolve_dir(str(path_or_name))
    cfg = read_config(directory, **compute_overrides)
    source = _Checkpoint(directory)
    layout = _layout(cfg)
    source.check(layout, extra_keys)
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

def to_hf_state_dict(params, cfg: GPT2Config, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Host numpy arrays under GPT2LMHeadModel's keys (lm_head tied, so left out)."""
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    inner = params["params"] if "params" in params else params
    out = {}
    for t in _layout(cfg):
        node = inner
        for p in t.path:
            node = node[p]
        value = np.asarray(jax.device_get(node), dtype=np.float32)
        if t.path == ("wte",):
            value = value[:cfg.vocab_size]
        if value.shape != _global_shape(t, cfg) and t.path != ("wte",):
            raise HFFormatError(f"param {'/'.join(t.path)} has shape {value.shape}, expected {_global_shape(t, cfg)}")
        layers = list(value) if t.stacked else [value]
        for key, v in zip(t.hf_keys, layers):
            out["transformer." + key] = np.ascontiguousarray(v.reshape(t.hf_shape)).astype(np_dtype)
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


def _verify_tokens(cfg: GPT2Config) -> np.ndarray:
    B, T = VERIFY_PROMPTS
    T = min(T, cfg.n_positions)
    return (np.arange(B * T).reshape(B, T) * 7919 + 13) % cfg.vocab_size


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg: GPT2Config, params, tokens):
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    return GPT2(cfg).apply(params, tokens, positions, jnp.ones_like(tokens))


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


def export_hf(params, cfg: GPT2Config, out_dir, *, tokenizer=None, chat_template: str | None = None,
              dtype: str = "float32", verify: bool = True, overwrite: bool = False) -> ExportReport:
    """Write an HF GPT-2 dir (config, safetensors, generation config, tokenizer), verify it, then
    move it into place. On any failure nothing is left at ``out_dir``."""
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
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
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


def _verify(host: dict, cfg32: GPT2Config, tmp: Path, dtype: str, tokenizer, report: ExportReport) -> None:
    """Reload what was written and compare logits: JAX reload, then transformers if importable.

    JAX's logits are computed with full float32 matmuls: on GPUs the default precision for
    float32 is TF32 (10-bit mantissa), which alone differs from PyTorch's CPU float32 by ~1e-3."""
    _, reloaded = load_hf(tmp, dtype="float32")
    tokens = jnp.asarray(_verify_tokens(cfg32), jnp.int32)
    V = cfg32.vocab_size
    with jax.default_matmul_precision("highest"):
        got = np.asarray(_logits(cfg32, reloaded, tokens))[..., :V]
        want = np.asarray(_logits(cfg32, jax.tree.map(jnp.asarray, host), tokens))[..., :V]
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
        from transformers import AutoModelForCausalLM
    except ImportError:
        report.checks.append("transformers logits: skipped (torch not importable)")
        return
    model = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
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
