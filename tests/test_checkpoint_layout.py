"""The orbax layout training and conversion share: items, steps, restores onto any mesh, detection."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_fixtures import CHAT_TEMPLATE, make_hf_model, save_hf_model, train_tokenizer
from sft_jax.core import checkpoint
from sft_jax.models.gpt2 import GPT2Config, param_shapes

CFG = GPT2Config.preset("tiny", vocab_size=300, n_positions=64, eos_token_id=0, bos_token_id=0)
OPT = optax.adamw(1e-3)


@pytest.fixture(scope="module")
def state():
    # random values on the model's shapes (init_params would compile the whole forward pass)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda x: jax.numpy.asarray(rng.normal(size=x.shape).astype(np.float32)),
                          nn.unbox(param_shapes(CFG)))
    opt_state = OPT.init(params)
    # one real update so mu/nu/count are not just zeros
    grads = jax.tree.map(lambda p: 0.01 * p, params)
    _, opt_state = OPT.update(grads, opt_state, params)
    tokenizer = train_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return params, opt_state, tokenizer


@pytest.fixture(scope="module")
def ckpt(state, tmp_path_factory):
    params, opt_state, tokenizer = state
    root = tmp_path_factory.mktemp("ckpt") / "run"
    manager = checkpoint.make_manager(root, keep=2)  # async saves
    for step in (10, 20, 30):
        train_state = {"step": step, "data": {"epoch": 0, "index": step * 4}, "rng": [0, step], "tokens_seen": step * 128}
        assert checkpoint.save(manager, step, params=params, model_config=CFG, tokenizer=tokenizer,
                               opt_state=opt_state, train_state=train_state)
    manager.wait_until_finished()
    manager.close()
    return root


def _equal(a, b):
    """Same tree structure, then every leaf bit-equal (zipping leaves alone calls ``{}`` equal to anything)."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_layout_and_steps(ckpt):
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["20", "30"]  # keep=2
    assert checkpoint.latest_step(ckpt) == 30
    items = {p.name for p in (ckpt / "30").iterdir() if p.is_dir()}
    assert items == {"params", "opt_state", "model_config", "tokenizer", "train_state"}
    assert checkpoint.latest_step(ckpt.parent / "missing") is None


def test_restore_root_step_and_step_dir(ckpt, state):
    params, _, tokenizer = state
    latest = checkpoint.restore(ckpt)
    assert latest["step"] == 30 and latest["opt_state"] is None
    assert latest["model_config"] == CFG
    assert latest["train_state"] == {"step": 30, "data": {"epoch": 0, "index": 120}, "rng": [0, 30], "tokens_seen": 3840}
    assert _equal(latest["params"], params)
    assert latest["tokenizer"].chat_template == CHAT_TEMPLATE
    assert latest["tokenizer"].encode("Hello world") == tokenizer.encode("Hello world")
    assert checkpoint.restore(ckpt, step=20)["train_state"]["step"] == 20
    assert checkpoint.restore(ckpt / "20")["step"] == 20
    with pytest.raises(checkpoint.CheckpointError, match="no step 10"):
        checkpoint.restore(ckpt, step=10)


def test_restore_sharded_onto_a_mesh(ckpt, state):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake CPU) devices")
    params, opt_state, _ = state
    mesh = jax.make_mesh((2, 4), ("data", "model"))

    def abstract(x):  # shard the largest axis that divides 4, else replicate
        spec = [None] * x.ndim
        for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
            if x.shape[axis] % 4 == 0:
                spec[axis] = "model"
                break
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(*spec)))

    params_target = jax.tree.map(abstract, params)
    opt_target = jax.tree.map(abstract, opt_state)
    out = checkpoint.restore(ckpt, params_target=params_target, opt_state_target=opt_target)
    wte = out["params"]["params"]["wte"]
    assert wte.sharding == params_target["params"]["wte"].sharding
    assert _equal(out["params"], params) and _equal(out["opt_state"], opt_state)
    assert jax.tree.structure(out["opt_state"]) == jax.tree.structure(opt_state)  # optax namedtuples back
    # without a target the optimizer state still comes back (as plain containers) when asked
    plain = jax.tree.leaves(checkpoint.restore(ckpt, with_opt_state=True)["opt_state"])
    assert len(plain) == len(jax.tree.leaves(opt_state))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, jax.tree.leaves(opt_state)))


def test_load_model_detects_the_source(ckpt, state, tmp_path):
    params, _, _ = state
    for path in (ckpt, ckpt / "30"):
        cfg, restored, tokenizer = checkpoint.load_model(path)
        assert cfg == CFG and _equal(restored, params) and tokenizer.chat_template == CHAT_TEMPLATE
    hf_dir = save_hf_model(make_hf_model(seed=0), tmp_path / "hf")
    cfg, _, tokenizer = checkpoint.load_model(hf_dir)
    assert cfg.n_layer == 2 and tokenizer is None  # no tokenizer files in that dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="neither"):
        checkpoint.load_model(tmp_path / "empty")
    with pytest.raises(checkpoint.CheckpointError, match="not an sft_jax orbax checkpoint"):
        checkpoint.restore(tmp_path / "empty")


def test_minimal_save_without_optional_items(state, tmp_path):
    params, _, _ = state
    manager = checkpoint.make_manager(tmp_path / "min", async_save=False)
    checkpoint.save(manager, 0, params=params, model_config=CFG.to_dict())
    manager.close()
    out = checkpoint.restore(tmp_path / "min")
    assert out["tokenizer"] is None and out["train_state"] is None and out["step"] == 0
    with pytest.raises(checkpoint.CheckpointError, match="no opt_state"):
        checkpoint.restore(tmp_path / "min", with_opt_state=True)
