"""HF -> orbax -> HF through the real CLI, sharded import, other HF layouts, and every bad input."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from hf_fixtures import CHAT_TEMPLATE, make_hf_model, save_hf_model, torch_logits, train_tokenizer
from train_fixtures import assert_trees_equal
from sft_jax import convert
from sft_jax.models import hf_io as hf
from sft_jax.core import checkpoint

torch = pytest.importorskip("torch")
TOKENS = np.random.RandomState(0).randint(0, 300, (2, 16))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An HF dir with a random tiny model and a tokenizer carrying a chat template."""
    model = make_hf_model(seed=3)
    directory = save_hf_model(model, tmp_path_factory.mktemp("src") / "hf")
    tokenizer = train_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return model, directory


@pytest.fixture(scope="module")
def loaded(source):
    return hf.load_hf(source[1])


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _convert(*args) -> subprocess.CompletedProcess:
    """``python -m sft_jax.convert ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "sft_jax.convert", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_roundtrip_is_bit_identical_and_loads_in_transformers(source, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, src = source
    run = _convert("hf-to-orbax", src, tmp_path / "ckpt")
    assert run.returncode == 0, run.stderr
    assert checkpoint.latest_step(tmp_path / "ckpt") == 0
    run = _convert("orbax-to-hf", tmp_path / "ckpt", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert "jax reload: float32 logits bit-identical" in run.stdout
    assert "transformers float32 logits" in run.stdout

    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    before.pop("lm_head.weight", None)
    assert set(before) == set(after)
    for key in before:
        assert before[key].dtype == after[key].dtype == np.float32, key
        assert np.array_equal(_bits(before[key]), _bits(after[key])), key

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
    assert np.array_equal(torch_logits(reloaded, TOKENS), torch_logits(model, TOKENS))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.encode("Hello world") == AutoTokenizer.from_pretrained(str(src)).encode("Hello world")
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["pad_token_id"] == generation["eos_token_id"] == 0


def test_bfloat16_export(loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, params = loaded
    report = hf.export_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    assert any("bfloat16" in c for c in report.checks) and "transformers" in report.max_abs_diff
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    wte = np.asarray(params["params"]["wte"])[:cfg.vocab_size]
    got = model.transformer.wte.weight.detach().float().numpy()
    assert np.array_equal(got, wte.astype("bfloat16").astype(np.float32))
    # Our reader takes BF16 safetensors too.
    _, back = hf.load_hf(tmp_path / "bf16")
    assert np.array_equal(np.asarray(back["params"]["wte"])[:cfg.vocab_size], got)


def test_sharded_import_reads_slices(source, loaded, tmp_path, monkeypatch):
    """A multi-file (indexed) checkpoint loaded onto a 2x4 mesh equals the one-device load."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake CPU) devices")
    model, _ = source
    directory = save_hf_model(model, tmp_path / "multi", max_shard_size="60KB")
    assert (directory / "model.safetensors.index.json").is_file()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    specs = {"wte": P("model", "data"), "wpe": P(None, "data"), "ln_f": {"scale": P("model"), "bias": P()},
             "h": {"ln_1": {"scale": P(None, "data"), "bias": P()}, "ln_2": {"scale": P(), "bias": P(None, "model")},
                   "attn": {"c_attn_kernel": P(None, "data", None, "model", None),  # heads: a strided read
                            "c_attn_bias": P("data", None, "model"),
                            "c_proj_kernel": P(None, "model", None, "data"),  # (H,K) from HF rows: contiguous
                            "c_proj_bias": P(None, "model")},
                   "mlp": {"c_fc_kernel": P("data", None, "model"), "c_fc_bias": P(None, "model"),
                           "c_proj_kernel": P(None, "model", "data"), "c_proj_bias": P()}}}
    shardings = {"params": jax.tree.map(lambda s: NamedSharding(mesh, s), specs)}
    reads = []  # (HF key, elements read, elements in the tensor), per read of a safetensors file
    whole_read = hf._SafetensorsFile.read

    def recording_read(self, key, index):
        block = whole_read(self, key, index)
        reads.append((key, block.size, math.prod(self.shape(key))))
        return block

    monkeypatch.setattr(hf._SafetensorsFile, "read", recording_read)
    cfg, params = hf.load_hf(directory, shardings=shardings)
    _, reference = loaded
    wte = params["params"]["wte"]
    assert wte.sharding == shardings["params"]["wte"]
    assert wte.addressable_shards[0].data.shape == (cfg.padded_vocab_size // 4, cfg.n_embd // 2)
    assert_trees_equal(params, reference)
    # each device's block is read from the file, not the whole tensor sliced afterwards
    wte_reads = [n for key, n, _ in reads if key.endswith("wte.weight")]
    assert len(wte_reads) == 8 and max(wte_reads) == math.prod(wte.addressable_shards[0].data.shape), wte_reads
    assert sum(n for _, n, _ in reads) <= 0.6 * sum(full for _, _, full in reads)
    assert not np.asarray(wte)[cfg.vocab_size:].any()  # padding rows are zeros


def test_pytorch_bin_and_unprefixed_keys(source, loaded, tmp_path):
    model, src = source
    _, reference = loaded
    # pytorch_model.bin holding GPT2Model keys (no "transformer." prefix) plus the old mask buffers.
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(src / "config.json", directory / "config.json")
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(state, directory / "pytorch_model.bin")
    _, params = hf.load_hf(directory)
    assert_trees_equal(params, reference)


# --- bad inputs ----------------------------------------------------------------------

def _copy_with(src, dst, mutate=None, config=None):
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if mutate:
        mutate(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_not_gpt2_config(source, tmp_path):
    config = json.loads((source[1] / "config.json").read_text())
    config["model_type"] = "llama"
    with pytest.raises(hf.HFFormatError, match=r"config\.json.*llama"):
        hf.load_hf(_copy_with(source[1], tmp_path / "d", config=config))
    with pytest.raises(hf.HFFormatError, match="config.json"):
        hf.load_hf(tmp_path)  # no config.json at all


def test_missing_tensor(source, tmp_path):
    directory = _copy_with(source[1], tmp_path / "d", lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(hf.HFFormatError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.bias'"):
        hf.load_hf(directory)


def test_misshaped_tensor(source, tmp_path):
    def mutate(t):
        t["transformer.h.0.attn.c_attn.weight"] = t["transformer.h.0.attn.c_attn.weight"][:, :-1].copy()

    with pytest.raises(hf.HFFormatError, match=r"model\.safetensors.*h\.0\.attn\.c_attn\.weight.*\(64, 191\)"):
        hf.load_hf(_copy_with(source[1], tmp_path / "d", mutate))


def test_unexpected_tensor(source, tmp_path):
    directory = _copy_with(source[1], tmp_path / "d", lambda t: t.update(score=np.zeros((2, 64), np.float32)))
    with pytest.raises(hf.HFFormatError, match="unexpected tensors.*score"):
        hf.load_hf(directory)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(source, tmp_path, damage):
    directory = _copy_with(source[1], tmp_path / "d")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x37" * 100)
    with pytest.raises(hf.HFFormatError, match="model.safetensors"):
        hf.load_hf(directory)


def test_export_refuses_non_empty_dir_and_overwrites_on_request(loaded, tmp_path):
    cfg, params = loaded
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(hf.HFFormatError, match="not empty"):
        hf.export_hf(params, cfg, out)
    assert os.listdir(out) == ["keep.txt"]
    hf.export_hf(params, cfg, out, overwrite=True, verify=False)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or old dirs left beside it


def test_export_verification_failure_leaves_nothing(loaded, tmp_path, monkeypatch):
    cfg, params = loaded
    real_write = hf.write_safetensors

    def corrupting_write(tensors, path):
        tensors["transformer.h.1.mlp.c_proj.weight"][3, 5] += 1e-3
        real_write(tensors, path)

    monkeypatch.setattr(hf, "write_safetensors", corrupting_write)
    with pytest.raises(hf.HFFormatError, match="verification failed.*max abs diff"):
        hf.export_hf(params, cfg, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def _bad_sources(src, tmp):
    """name -> (HF dir with one defect, text the error line must contain)."""
    config = json.loads((src / "config.json").read_text())
    out = {"not_gpt2": (_copy_with(src, tmp / "llama", config=dict(config, model_type="llama")), "'llama'"),
           "no_config": (_copy_with(src, tmp / "no_config"), "config.json"),
           "missing_tensor": (_copy_with(src, tmp / "missing", lambda t: t.pop("transformer.wpe.weight")),
                              "missing tensor 'wpe.weight'"),
           "misshaped_tensor": (_copy_with(src, tmp / "shape", lambda t: t.update(
               {"transformer.ln_f.bias": np.zeros(63, np.float32)})), "'transformer.ln_f.bias' has shape (63,)"),
           "truncated_safetensors": (_copy_with(src, tmp / "truncated"), "not a readable safetensors file"),
           "corrupt_pytorch_bin": (tmp / "bin", "pytorch_model.bin: not a readable PyTorch checkpoint"),
           "no_such_dir": (tmp / "nowhere" / "model", "no such model directory")}
    (tmp / "no_config" / "config.json").unlink()
    weights = tmp / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (tmp / "bin").mkdir()
    shutil.copy(src / "config.json", tmp / "bin" / "config.json")
    (tmp / "bin" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    return out


BAD_SOURCES = ["not_gpt2", "no_config", "missing_tensor", "misshaped_tensor", "truncated_safetensors",
               "corrupt_pytorch_bin", "no_such_dir"]


@pytest.mark.parametrize("name", BAD_SOURCES)
def test_cli_bad_source_is_one_error_line_and_writes_nothing(source, tmp_path, capsys, name):
    bad, says = _bad_sources(source[1], tmp_path / "bad")[name]
    dst = tmp_path / "ckpt"
    assert convert.main(["hf-to-orbax", str(bad), str(dst)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert says in captured.err
    assert not dst.exists()


def test_cli_bad_source_in_a_fresh_process(source, tmp_path):
    """The real ``python -m sft_jax.convert``: exit status 2 and nothing on stderr but the one line."""
    bad, says = _bad_sources(source[1], tmp_path / "bad")["missing_tensor"]
    run = _convert("hf-to-orbax", bad, tmp_path / "ckpt")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and says in run.stderr, run.stderr
    assert not (tmp_path / "ckpt").exists()


def test_export_without_torch_says_what_it_skipped(loaded, tmp_path, monkeypatch):
    """Writing needs no torch; with torch unimportable the HF check is reported as skipped."""
    from safetensors.numpy import load_file as load

    cfg, params = loaded
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    report = hf.export_hf(params, cfg, tmp_path / "out")
    assert report.checks == ["jax reload: float32 logits bit-identical",
                             "transformers logits: skipped (torch not importable)"]
    assert report.max_abs_diff == {"jax_reload": 0.0}
    wte = load(tmp_path / "out" / "model.safetensors")["transformer.wte.weight"]
    assert np.array_equal(wte, np.asarray(params["params"]["wte"])[:cfg.vocab_size])  # padding trimmed
    bin_dir, _ = _bad_sources(tmp_path / "out", tmp_path / "bad")["corrupt_pytorch_bin"]
    with pytest.raises(hf.HFFormatError, match="pytorch_model.bin needs torch"):
        hf.load_hf(bin_dir)


def test_cli_user_error_is_one_line(tmp_path, capsys):
    assert convert.main(["orbax-to-hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
