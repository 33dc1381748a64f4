"""The Llama family (Llama, Qwen2, Mistral) against transformers' torch models on the same random
weights: logits on long prompts, packed rows, KV-cache greedy decoding; the HF key map, and
reading and exporting directories through sft_jax.models.hf_io; configs, presets and their parameter counts.

Prompts are 320 tokens: rotation at position 0 is the identity, so short prompts hide rotary bugs.
Weights are drawn wider than HF's init (and norms and biases randomised) so attention is far
from uniform and a wrong rotary layout, kv grouping or bias cannot hide.
"""

from __future__ import annotations

import copy
import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import flax.linen as nn
from safetensors import safe_open

from sft_jax.models import hf_io
from sft_jax.models.llama import hf as llama_hf
from sft_jax.models.llama.model import (
    MODEL_TYPES,
    PRESETS,
    Llama,
    LlamaConfig,
    init_cache,
    init_params,
    lm_logits,
    param_shapes,
    token_nll,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 300
T = 320  # positions up to 319: the fastest pair turns ~50 times
DOCS = (100, 120, 90)  # a packed row: three documents, then 10 padding slots
ATOL = 1e-4
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
# name: HF config fields (4 query heads, hidden 64; head_dim 16 unless given)
CASES = {
    "llama_kv1_untied": dict(model_type="llama", num_key_value_heads=1, rope_theta=10000.0,
                             tie_word_embeddings=False),
    # wavelengths 6..2e4 against a 64-token original context: all three llama3 bands are used
    "llama_kv2_llama3_tied": dict(model_type="llama", num_key_value_heads=2, rope_theta=10000.0,
                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=64),
                                  tie_word_embeddings=True),
    "llama_kv4_linear_bias": dict(model_type="llama", num_key_value_heads=4, rope_theta=10000.0,
                                  rope_scaling=dict(rope_type="linear", factor=2.0), attention_bias=True,
                                  tie_word_embeddings=False),
    "qwen2_kv2_tied": dict(model_type="qwen2", num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True),
    # head_dim 32 != 64 / 4; a window of exactly T keys is full attention
    "mistral_kv2_head_dim32": dict(model_type="mistral", num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                                   sliding_window=T, tie_word_embeddings=False),
}
DECODE_CASES = ["llama_kv1_untied", "llama_kv2_llama3_tied", "llama_kv4_linear_bias"]  # 1, 2 and 4 kv heads
PROMPT_LENGTHS = (300, 257)  # left-padded into one batch, as the sampler does
NEW_TOKENS = 12


def make_hf_model(name: str, seed: int = 0):
    """A random transformers model in float32, eval mode, eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(**BASE, **CASES[name])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if key.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif key.endswith(".bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0].numpy()


def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row 0: one document of T tokens. Row 1: DOCS packed, positions restarting, segments 1,2,3,
    then padding (segment 0)."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCAB, (2, T)).astype(np.int32)
    positions = np.zeros((2, T), np.int32)
    segments = np.zeros((2, T), np.int32)
    positions[0], segments[0] = np.arange(T), 1
    start = 0
    for i, n in enumerate(DOCS):
        positions[1, start:start + n], segments[1, start:start + n] = np.arange(n), i + 1
        start += n
    tokens[1, start:] = 0
    return tokens, positions, segments


@functools.lru_cache(maxsize=None)
def _forward(cfg: LlamaConfig):
    return jax.jit(lambda p, t, pos, s: Llama(cfg).apply(p, t, pos, s))


@functools.lru_cache(maxsize=None)
def case(name: str):
    """(HF model, config, params, JAX logits of ``batch()``), built once per case."""
    model = make_hf_model(name)
    cfg = LlamaConfig.from_hf_config(model.config)
    params = llama_hf.from_hf_state_dict(model.state_dict(), cfg)
    logits = np.asarray(_forward(cfg)(params, *map(jnp.asarray, batch())))
    return model, cfg, params, logits


# --- logits -------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers_on_a_long_prompt(name):
    model, cfg, _, logits = case(name)
    tokens = batch()[0][0]
    want = hf_logits(model, tokens)
    assert np.all(np.isneginf(logits[..., VOCAB:]))  # padded vocab rows
    diff = np.abs(logits[0, :, :VOCAB] - want)
    assert diff.max() < ATOL, f"max |JAX - HF| {diff.max():.3g}"
    assert np.abs(want).max() > 1.0  # the logits are not near zero, so the tolerance means something


@pytest.mark.parametrize("name", CASES)
def test_packed_row_equals_each_document_alone(name):
    model, _, _, logits = case(name)
    tokens = batch()[0][1]
    start = 0
    for n in DOCS:
        want = hf_logits(model, tokens[start:start + n])
        np.testing.assert_allclose(logits[1, start:start + n, :VOCAB], want, rtol=0, atol=ATOL)
        start += n


# --- KV-cache greedy decoding ---------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _greedy(cfg: LlamaConfig, steps: int):
    """Left-padded prefill in one call, then one-token steps (sft_jax.inference.sampling's layout)."""
    model = Llama(cfg)

    def run(params, tokens, lengths):
        B, T0 = tokens.shape
        slot = jnp.arange(T0)[None, :]
        first_real = T0 - lengths[:, None]
        segment_ids = (slot >= first_real).astype(jnp.int32)
        positions = jnp.maximum(slot - first_real, 0)
        logits, cache = model.apply(params, tokens, positions, segment_ids, cache=init_cache(cfg, B, T0 + steps))
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

        def step(i, carry):
            out, token, cache = carry
            out = out.at[:, i].set(token)
            logits, cache = model.apply(params, token[:, None], (lengths + i)[:, None], jnp.ones((B, 1), jnp.int32),
                                        cache=cache)
            return out, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

        out, _, _ = jax.lax.fori_loop(0, steps, step, (jnp.zeros((B, steps), jnp.int32), token, cache))
        return out

    return jax.jit(run)


@pytest.mark.parametrize("name", DECODE_CASES)
def test_greedy_kv_cache_decoding_matches_generate(name):
    model, cfg, params, _ = case(name)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, VOCAB, n).tolist() for n in PROMPT_LENGTHS]
    T0 = -(-max(PROMPT_LENGTHS) // 8) * 8
    tokens = np.zeros((len(prompts), T0), np.int32)
    for row, p in zip(tokens, prompts):
        row[T0 - len(p):] = p
    got = np.asarray(_greedy(cfg, NEW_TOKENS)(params, jnp.asarray(tokens),
                                              jnp.asarray([len(p) for p in prompts], jnp.int32)))
    for p, row in zip(prompts, got.tolist()):
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=0, do_sample=False, eos_token_id=-1,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        top2 = torch.stack(out.scores, 1).topk(2, dim=-1).values
        margin = float((top2[..., 0] - top2[..., 1]).min())
        assert margin > 1e-3, f"near-tie in HF's greedy path (margin {margin}); pick other prompts"
        assert row == out.sequences[0, len(p):].tolist()


# --- HF conversion ------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_config_and_parameter_count_match_transformers(name, tmp_path):
    from transformers import AutoConfig

    model, cfg, params, _ = case(name)
    assert cfg.num_params() == model.num_parameters()
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params(include_vocab_padding=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    loaded = AutoConfig.from_pretrained(str(tmp_path))
    assert loaded.model_type == cfg.model_type
    assert LlamaConfig.from_hf_config(loaded) == cfg
    assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", CASES)
def test_export_loads_as_the_right_class_with_equal_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    _, cfg, params, logits = case(name)
    out = hf_io.export_hf(params, cfg, tmp_path / "export", verify=False).out_dir
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == MODEL_TYPES[cfg.model_type]
    assert LlamaConfig.from_hf_config(model.config) == cfg
    got = hf_logits(model, batch()[0][0])
    np.testing.assert_allclose(got, logits[0, :, :VOCAB], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["llama_kv1_untied", "qwen2_kv2_tied"])
def test_state_dict_round_trip_is_bit_identical(name):
    model, cfg, _, _ = case(name)
    params = jax.jit(functools.partial(init_params, cfg))(jax.random.key(0))
    back = llama_hf.from_hf_state_dict(llama_hf.to_hf_state_dict(params, cfg), cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(np.asarray(a), b)
    table = np.asarray(params["params"]["embed_tokens"])
    assert not table[VOCAB:].any() and table[:VOCAB].std() > 0  # padding rows start at zero
    # and the other way round, from transformers' own tensors
    keys = set(llama_hf.to_hf_state_dict(params, cfg))
    sd = {k: v.numpy() for k, v in model.state_dict().items() if k in keys}  # a tied lm_head.weight left out
    again = llama_hf.to_hf_state_dict(llama_hf.from_hf_state_dict(sd, cfg), cfg)
    assert set(again) == set(sd) and all(np.array_equal(again[k], sd[k]) for k in sd)
    # shapes and logical names agree with the module's own
    abstract = param_shapes(cfg)
    assert jax.tree.map(lambda x: x.shape, nn.unbox(abstract)) == jax.tree.map(np.shape, back)


def test_sharded_and_bfloat16_dirs_load(tmp_path):
    model, cfg, params, _ = case("llama_kv2_llama3_tied")
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    got_cfg, got = hf_io.load_hf(tmp_path / "sharded")
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, params)

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.save_pretrained(str(tmp_path / "bf16"))
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="numpy") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(ml_dtypes.bfloat16)}
    _, got = hf_io.load_hf(tmp_path / "bf16")
    want = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_key_map_names_missing_unexpected_and_misshapen_tensors():
    _, cfg, params, _ = case("mistral_kv2_head_dim32")
    sd = llama_hf.to_hf_state_dict(params, cfg)
    broken = dict(sd)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.q_proj.bias"] = np.zeros(128, np.float32)
    with pytest.raises(ValueError, match=r"missing \[model\.layers\.1\.mlp\.up_proj\.weight\].*"
                                         r"unexpected \[model\.layers\.0\.self_attn\.q_proj\.bias\]"):
        llama_hf.from_hf_state_dict(broken, cfg)
    misshapen = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 64), np.float32)})
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(32, 64\), expected \(64, 64\)"):
        llama_hf.from_hf_state_dict(misshapen, cfg)


# --- head, configs, presets -------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama_kv1_untied", "qwen2_kv2_tied"])
def test_head_functions_pick_the_right_table(name):
    _, cfg, params, logits = case(name)
    tokens, positions, segments = map(jnp.asarray, batch())
    hidden = jax.jit(lambda p: Llama(cfg).apply(p, tokens, positions, segments, return_hidden=True))(params)
    head = jax.jit(lambda p, h: (lm_logits(p, h, cfg), token_nll(p, h, tokens, cfg, chunk=64)))
    got, nll = head(params, hidden)
    np.testing.assert_allclose(np.asarray(got), logits, rtol=0, atol=1e-5)
    want = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(nll), want, rtol=0, atol=1e-4)


def test_unsupported_rope_types_raise_naming_the_type():
    conf = dict(BASE, model_type="llama", num_key_value_heads=2,
                rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128))
    with pytest.raises(ValueError, match=r"'yarn'.*default, linear, llama3"):
        LlamaConfig.from_hf_config(conf)
    with pytest.raises(ValueError, match=r"'dynamic'.*default, linear, llama3"):
        LlamaConfig.from_hf_config(dict(conf, rope_scaling=None, rope_parameters=dict(rope_type="dynamic", factor=2.0)))
    with pytest.raises(ValueError, match=r"'longrope'"):
        LlamaConfig.preset("llama_tiny", rope_type="longrope")


def test_a_window_shorter_than_the_sequence_is_refused():
    cfg = LlamaConfig.preset("llama_tiny", model_type="mistral", rope_type="default", use_sliding_window=True,
                             sliding_window=32)
    x = jnp.zeros((1, 33), jnp.int32)
    with pytest.raises(ValueError, match="sliding_window=32"):
        jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), x, x, x + 1))
    jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), x[:, :32], x[:, :32], x[:, :32] + 1))


AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_by_shape(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = LlamaConfig.preset(name)
    abstract = param_shapes(cfg)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract)))
    assert count == cfg.num_params(include_vocab_padding=True)
    documented = PRESETS[name][0]
    assert abs(cfg.num_params() / documented - 1) < 0.01, (cfg.num_params(), documented)
    names = {a for spec in jax.tree.leaves(nn.get_partition_spec(abstract), is_leaf=lambda s: isinstance(s, tuple))
             for a in spec}
    assert names <= AXIS_NAMES and {"kv_heads", "heads", "layers"} <= names
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    hf_config = AutoConfig.from_pretrained(str(tmp_path))
    assert LlamaConfig.from_hf_config(hf_config) == cfg
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(hf_config)
    assert type(model).__name__ == MODEL_TYPES[cfg.model_type]
    assert model.num_parameters() == cfg.num_params()
    # 6N over the matmul weights (an untied input embedding is a lookup) + 12 L (H K) T
    matmul_params = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 2048
    assert cfg.flops_per_token(2048) == 6 * matmul_params + attention == 3 * cfg.flops_per_token(2048, training=False)


# --- compute settings ------------------------------------------------------------------

def test_unrolled_rematerialised_and_bfloat16_runs_agree():
    _, cfg, params, logits = case("qwen2_kv2_tied")
    inputs = map(jnp.asarray, batch())
    unrolled = np.asarray(_forward(cfg.replace(scan_layers=False, remat="full"))(params, *batch()))
    np.testing.assert_allclose(unrolled, logits, rtol=0, atol=1e-5)
    bf16 = np.asarray(_forward(cfg.replace(dtype="bfloat16"))(params, *inputs))
    real = batch()[2] > 0
    diff = np.abs(bf16[real][:, :VOCAB] - logits[real][:, :VOCAB]).max()
    largest = np.abs(logits[real][:, :VOCAB]).max()
    assert bf16.dtype == np.float32 and diff < 2.0 ** -3 * largest, (diff, largest)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_fused_attention_paths_match_xla_with_grouped_kv(impl, monkeypatch):
    """The flash kernels (Pallas interpret mode on CPU) on a packed row with 2 kv heads for 4 query
    heads: equal to the masked XLA reference at every real token (padding outputs are zero there)."""
    import sft_jax.models.llama.model as llama_model

    _, cfg, params, _ = case("llama_kv2_llama3_tied")
    cfg = cfg.replace(attention="xla")
    Tf = 128  # splash tiles are multiples of 128
    tokens, positions, segments = (x[:, :Tf] for x in batch())
    segments = segments.copy()
    segments[1, 100:] = 0  # the packed row: documents 1 (0..99) and 2 (100..119) cut short, then padding
    segments[1, 100:120] = 2
    positions = positions.copy()
    positions[1, 100:120] = np.arange(20)
    want = np.asarray(_forward(cfg)(params, tokens, positions, segments))
    monkeypatch.setattr(llama_model, "dot_product_attention",
                        functools.partial(llama_model.dot_product_attention, interpret=True))
    got = np.asarray(jax.jit(lambda p, t, pos, s: Llama(cfg.replace(attention=impl)).apply(p, t, pos, s))(
        params, tokens, positions, segments))
    real = segments > 0
    np.testing.assert_allclose(got[real][:, :VOCAB], want[real][:, :VOCAB], rtol=0, atol=1e-4)
