"""HF -> orbax -> HF through ``python -m sft_jax.convert`` for the Llama family's three model types,
from sharded safetensors: every tensor bit-identical, the export loading as the right class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sft_jax import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
CASES = {
    "llama": dict(num_key_value_heads=1, tie_word_embeddings=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=64)),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=128),
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def safetensors_dir(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("model_type", CASES)
def test_convert_round_trip_is_bit_identical(model_type, tmp_path, capsys):
    from hf_fixtures import train_tokenizer

    conf = transformers.AutoConfig.for_model(model_type=model_type, **BASE, **CASES[model_type])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(conf).float().eval()
    src = tmp_path / "src"
    model.save_pretrained(str(src), max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 1
    train_tokenizer().save_pretrained(str(src))

    assert convert.main(["hf-to-orbax", str(src), str(tmp_path / "ckpt")]) == 0
    assert convert.main(["orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    assert "jax reload: float32 logits bit-identical" in capsys.readouterr().out

    before, after = safetensors_dir(src), safetensors_dir(tmp_path / "out")
    if conf.tie_word_embeddings:
        before.pop("lm_head.weight", None)
    assert set(before) == set(after)
    for key, value in before.items():
        assert value.dtype == after[key].dtype == np.float32, key
        assert np.array_equal(value.view(np.uint32), after[key].view(np.uint32)), key
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["model_type"] == model_type and exported["architectures"] == [CLASSES[model_type]]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(reloaded).__name__ == CLASSES[model_type]
    tokens = torch.as_tensor(np.random.RandomState(0).randint(0, 300, (1, 96)))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(tokens).logits, model(tokens).logits)
