"""The seam between model families and everything else: objectives, the core, inference, analysis
and the commands reach a model only through ``sft_jax.models.family``; the registry; the one
reward read position; the HF key map's transposed and vocab-padded tensors; the stored family."""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest

from sft_jax.models import family as fam
from sft_jax.models import hf_io
from sft_jax.models.gpt2 import GPT2Config
from sft_jax.models.heads import last_non_eos_index, reward_read_position

PACKAGE = Path(fam.__file__).resolve().parents[1]
SEAM_DIRS = ("objectives", "core", "inference", "analysis")
COMMANDS = ("train", "reward", "dpo", "ppo", "generate", "chat", "convert", "analyze", "plan", "bench", "cli",
            "config")
FAMILY_IMPORT = re.compile(r"(sft_jax\.models\.gpt2|from sft_jax\.models import [^\n]*\bgpt2\b)")


def _seam_files() -> list[Path]:
    files = [f for d in SEAM_DIRS for f in sorted((PACKAGE / d).rglob("*.py"))]
    return files + [PACKAGE / f"{name}.py" for name in COMMANDS] + [PACKAGE / "data" / "__main__.py"]


def _gpt2_parameter_names() -> set[str]:
    """GPT-2's own parameter and module names, from its HF key map (generic ones such as
    ``scale``/``bias`` and logical axis names aside)."""
    from sft_jax.models.gpt2.hf import KEY_MAP

    names = set()
    for _, path, _, _ in KEY_MAP.global_layout + KEY_MAP.layer_layout:
        names.update(path.split("/"))
    return {n for n in names if n.startswith(("wte", "wpe", "ln_", "c_"))}


def test_no_objective_core_or_command_imports_a_family_or_names_its_parameters():
    names = _gpt2_parameter_names()
    assert {"wte", "wpe", "c_attn_kernel", "ln_f"} <= names
    quoted = re.compile("|".join(rf"[\"']{re.escape(n)}[\"']" for n in sorted(names)))
    offenders = []
    for f in _seam_files():
        text = f.read_text()
        for what, pattern in (("imports a family", FAMILY_IMPORT), ("names a GPT-2 parameter", quoted)):
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{f.relative_to(PACKAGE.parent)}:{line}: {what}: {m.group(0)}")
    assert not offenders, "\n".join(offenders)


def test_registry():
    assert "gpt2" in fam.SUPPORTED_MODEL_TYPES
    gpt2 = fam.get_family("gpt2")
    assert fam.family_of(GPT2Config()) is gpt2 and gpt2.config_cls is GPT2Config
    for family in fam.families():  # each registration loads, and its FAMILY agrees with its row
        assert set(fam.REGISTRY[family.name][1]) == set(family.model_types)
        assert set(family.presets) <= set(fam.preset_names())
    with pytest.raises(ValueError, match="model_type 'bert' is not supported; supported: ") as e:
        fam.get_family("bert")
    assert all(t in str(e.value) for t in fam.SUPPORTED_MODEL_TYPES)
    cfg = fam.config_for_preset("tiny", vocab_size=300, max_position_embeddings=64)
    assert isinstance(cfg, GPT2Config) and (cfg.vocab_size, cfg.n_positions, cfg.hidden_size) == (300, 64, 64)
    assert cfg.replace(max_position_embeddings=128).n_positions == 128
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        fam.config_for_preset("nope")


def test_unsupported_model_type_in_an_hf_dir_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(hf_io.HFFormatError, match=r"config\.json: model_type 'bert' is not supported; supported: gpt2"):
        hf_io.read_config(tmp_path)


def test_checkpoint_config_stores_the_family_and_reads_older_ones():
    cfg = GPT2Config.preset("tiny", vocab_size=300, dtype="bfloat16")
    stored = fam.config_to_dict(cfg)
    assert stored["model_type"] == "gpt2" and fam.config_from_dict(stored) == cfg
    assert fam.config_from_dict(cfg.to_dict()) == cfg  # written before the family was stored: GPT-2
    with pytest.raises(ValueError, match="not supported"):
        fam.config_from_dict({**stored, "model_type": "bert"})


def test_reward_read_position_is_transformers_rule():
    """The last token before the closing eos, as transformers reads rows right-padded with eos."""
    eos, T = 0, 12
    rng = np.random.default_rng(0)
    for length in range(1, T + 1):  # a sequence of `length` tokens whose last is eos, from slot 0
        row = np.full((1, T), eos)
        row[0, :length - 1] = rng.integers(1, 50, length - 1)
        if length > 1:
            assert reward_read_position(0, length) == last_non_eos_index(row, eos)[0]
    # no closing eos (a cut-off answer): its last token; arrays broadcast
    np.testing.assert_array_equal(reward_read_position(5, np.array([1, 3, 3]), np.array([True, True, False])),
                                  [4, 6, 7])
    assert reward_read_position(0, 1) == 0  # never before the row


def test_reward_read_position_is_the_only_rule():
    """The data pipeline, PPO, the scorer and the reward export all take it from one place."""
    for module in ("data/preference.py", "objectives/ppo.py", "inference/scoring.py", "models/hf_reward.py"):
        assert "reward_read_position(" in (PACKAGE / module).read_text(), module


def test_key_map_reads_transposed_and_vocab_padded_tensors_slice_by_slice(tmp_path):
    """A layout with an (out, in) tensor and an untied head padded on its second axis: written as
    HF tensors and read back whole and block by block, equal to the parameters."""
    from safetensors.numpy import save_file

    V, Vp, D, H, K, L = 10, 16, 6, 2, 3, 2
    keys = hf_io.KeyMap(prefix="model.", stack="layers", layer_key="layers.{i}.",
                        sizes=lambda cfg: {"V": V, "D": D, "H": H, "K": K},
                        global_layout=(("embed.weight", "embed", "V,D", "V,D"),
                                       ("lm_head.weight", "lm_head", "V,D", "D,V")),
                        layer_layout=(("q.weight", "q_kernel", "HK,D", "D,H,K"),),
                        vocab_axes=(("embed", 0), ("lm_head", 1)), transposed=frozenset({"lm_head", "q_kernel"}))
    cfg = types.SimpleNamespace(num_hidden_layers=L, vocab_size=V, padded_vocab_size=Vp)
    rng = np.random.default_rng(0)
    params = {"embed": np.concatenate([rng.standard_normal((V, D)), np.zeros((Vp - V, D))]).astype(np.float32),
              "lm_head": np.concatenate([rng.standard_normal((D, V)), np.zeros((D, Vp - V))], 1).astype(np.float32),
              "layers": {"q_kernel": rng.standard_normal((L, D, H, K)).astype(np.float32)}}
    tensors = hf_io._state_dict(params, cfg, keys, "float32")
    assert tensors["model.lm_head.weight"].shape == (V, D) and tensors["model.layers.1.q.weight"].shape == (H * K, D)
    np.testing.assert_array_equal(tensors["model.lm_head.weight"], params["lm_head"][:, :V].T)
    np.testing.assert_array_equal(tensors["model.layers.0.q.weight"], params["layers"]["q_kernel"][0].reshape(D, -1).T)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = hf_io._Checkpoint(tmp_path, keys.prefix)
    for t in hf_io.tensor_layout(cfg, keys):
        want = params[t.path[0]] if len(t.path) == 1 else params[t.path[0]][t.path[1]]
        shape = hf_io._global_shape(t, cfg)
        assert shape == want.shape
        np.testing.assert_array_equal(source.read(t, tuple(slice(0, n) for n in shape), shape), want)
        block = tuple(slice(n // 2, n) for n in shape)  # the upper half of every axis
        np.testing.assert_array_equal(source.read(t, block, shape), want[block])


@pytest.mark.parametrize("model_type, fields", [
    ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32))),
    ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
])
def test_a_second_family_loads_and_exports_through_the_generic_hf_code(tmp_path, model_type, fields):
    """Llama-architecture checkpoints (untied and tied, grouped kv heads, sharded files) read slice by
    slice through the family's key map equal the family's own whole-file reader, and export through
    the same verified path (transformers' logits within 1e-4 of JAX's)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_jax.models.llama import hf as llama_hf
    from sft_jax.models.llama.model import LlamaConfig
    from train_fixtures import assert_trees_equal

    conf = AutoConfig.for_model(model_type=model_type, vocab_size=300, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                bos_token_id=1, eos_token_id=2, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).float().eval()
    model.save_pretrained(str(tmp_path / "src"), max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    cfg, params = hf_io.load_hf(tmp_path / "src")
    assert fam.family_of(cfg).name == "llama" and cfg.model_type == model_type
    assert cfg == LlamaConfig.from_hf_config(model.config)
    reference = llama_hf.from_hf_state_dict(model.state_dict(), cfg)  # the in-memory mapping, from torch
    assert_trees_equal(params, reference)
    report = hf_io.export_hf(params, cfg, tmp_path / "out")
    assert report.max_abs_diff["jax_reload"] == 0.0 and report.max_abs_diff["transformers"] <= hf_io.HF_ATOL
