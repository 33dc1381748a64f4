"""Reward model export as GPT2ForSequenceClassification: transformers' scores equal JAX's; import back."""

import json

import jax
import numpy as np
import pytest

from hf_fixtures import EOS_ID, make_hf_model, save_hf_model, train_tokenizer
from sft_jax.models import hf_io as hf
from sft_jax.models import hf_reward
from sft_jax.objectives.preference_losses import init_reward_head

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    model = make_hf_model(seed=5)
    return hf.load_hf(save_hf_model(model, tmp_path_factory.mktemp("trunk") / "hf"))


@pytest.fixture(scope="module")
def exported(trunk, tmp_path_factory):
    cfg, params = trunk
    head = init_reward_head(cfg, jax.random.key(1))
    head = jax.tree.map(lambda k: k * 50.0, head)  # scores of order 1, so a wrong read position shows
    out = tmp_path_factory.mktemp("reward") / "rm"
    report = hf_reward.export_reward_hf(params, head, cfg, out, tokenizer=train_tokenizer())
    return cfg, params, head, out, report


def test_export_verifies_and_loads_in_transformers(exported):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, params, head, out, report = exported
    assert any("GPT2ForSequenceClassification scores within" in c for c in report.checks), report.checks
    assert report.max_abs_diff["reward_transformers"] <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["pad_token_id"] == EOS_ID
    model = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.config.num_labels == 1
    # Independent rows: real text of different lengths, response + eos, right-padded with eos.
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    texts = ["Hello world! How are you today?", "The quick brown fox", "sum"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [EOS_ID] for t in texts]
    T = max(map(len, ids)) + 3
    tokens = np.array([row + [EOS_ID] * (T - len(row)) for row in ids])
    with torch.no_grad():
        want = model(torch.from_numpy(tokens)).logits[:, 0].numpy()
    index = np.array([len(row) - 2 for row in ids])
    got = hf_reward.jax_scores(params, head, cfg, tokens, index)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.ptp(got) > 1e-2  # the rows really score differently


def test_import_roundtrip(exported):
    cfg, params, head, out, _ = exported
    cfg2, params2, head2 = hf_reward.load_reward_hf(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(head2["score"]["kernel"]), np.asarray(head["score"]["kernel"]))
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(hf.HFFormatError, match="unexpected tensors.*score.weight"):
        hf.load_hf(out)  # an LM import refuses the head rather than dropping it silently


def test_bad_reward_dirs(trunk, exported, tmp_path):
    cfg, params = trunk
    with pytest.raises(hf.HFFormatError, match="architectures"):
        hf_reward.load_reward_hf(hf.export_hf(params, cfg, tmp_path / "lm", verify=False).out_dir)
    _, _, head, out, _ = exported
    with pytest.raises(hf.HFFormatError, match="exists and is not empty"):
        hf_reward.export_reward_hf(params, head, cfg, out, verify=False)
    bad = {"score": {"kernel": np.zeros((cfg.n_embd, 2), np.float32)}}
    with pytest.raises(hf.HFFormatError, match="reward head kernel"):
        hf_reward.export_reward_hf(params, bad, cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
