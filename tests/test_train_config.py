"""Config: shipped YAMLs validate (full-size models by shape only), user errors fail early
with one clear line and exit 2, leaving no run directory behind."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from sft_jax.core import mesh as shd
from sft_jax import train
from sft_jax.objectives import sft
from sft_jax.config import ConfigError, from_dict, load_config
from sft_jax.analysis import memory as mem
from sft_jax.models.family import config_for_preset
from sft_jax.core.optimizer import make_optimizer
from train_fixtures import read_yaml, shipped_configs, write_tiny_yaml

HF_PRESETS = {"gpt2": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl",
              "runs/demo/hf": "demo",  # the SFT demo's export, where the preference demos start
              "runs/rl_sft_demo/hf": "demo",  # the RL demo's SFT start, the same architecture
              "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b", "meta-llama/Llama-3.2-1B": "llama3.2-1b",
              "meta-llama/Llama-3.1-8B": "llama3.1-8b"}
# the Llama-family configs: the device count and memory they are planned for
PLANNED = {"qwen2_5_0_5b_chat": (1, 80 * 10 ** 9), "llama3_2_1b_alpaca": (8, 80 * 10 ** 9),
           "llama3_1_8b_alpaca": (8, 80 * 10 ** 9)}


def test_top_level_configs_are_the_packaged_ones():
    from train_fixtures import REPO

    top = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert top == [p.name for p in shipped_configs()]
    for p in shipped_configs():
        assert (REPO / "configs" / p.name).read_text() == p.read_text()
    names = {p.stem for p in shipped_configs()}
    assert {"demo", "gpt2_alpaca", "gpt2_large_alpaca", "gpt2_xl_alpaca", "gpt2_medium_chat"} <= names


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.stem)
def test_shipped_config_validates_and_shards_on_8_devices(path):
    cfg = load_config(path)
    assert set(read_yaml(path)) <= {"model", "data", "train", "optim", "mesh", "checkpoint", "run", "distributed",
                                        "reward", "dpo", "ppo"}
    m = cfg.model
    if m.init_from == "scratch":
        model_cfg = config_for_preset(m.preset, vocab_size=512, max_position_embeddings=m.n_positions, dtype=m.dtype,
                                      remat=m.remat)
    else:
        model_cfg = config_for_preset(HF_PRESETS[m.init_from], dtype=m.dtype, remat=m.remat)
    assert cfg.data.max_length <= model_cfg.max_position_embeddings
    mesh = shd.make_mesh(cfg.mesh, jax.devices())
    shd.check_batch_fits(mesh, cfg.micro_batch_size())
    tx, schedule = make_optimizer(cfg.optim, 1000)
    abstract, shardings = sft.state_shardings(model_cfg, tx, mesh)  # eval_shape only: nothing allocated
    n = sum(x.size for x in jax.tree.leaves(abstract.params))
    assert n == model_cfg.num_params(include_vocab_padding=True)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract.params))  # master weights stay float32
    # the whole train step traces at full size (micro-batch scan, remat, loss chunks, shardings)
    step = sft.make_train_step(model_cfg, tx, schedule, mesh=mesh, shardings=shardings,
                              n_micro=cfg.accumulation_steps(), loss_chunk=cfg.train.loss_chunk,
                              clip_norm=cfg.optim.clip_norm)
    G, T = cfg.train.global_batch_size, cfg.data.max_length
    batch = {k: jax.ShapeDtypeStruct((G, T), jnp.float32 if k == "weights" else jnp.int32,
                                     sharding=shd.batch_sharding(mesh)) for k in sft.BATCH_KEYS}
    with shd.rules_context(mesh):
        new_state, step_metrics = jax.eval_shape(step.jitted, abstract, batch)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    assert step_metrics["loss"].dtype == jnp.float32
    # float32 logits of one micro-batch's loss chunk stay under 1 GiB even on a single
    # device (2 GiB with their gradient): big-vocabulary configs must set train.loss_chunk
    positions = cfg.train.loss_chunk or T
    assert cfg.micro_batch_size() * positions * model_cfg.padded_vocab_size * 4 <= 2**30, cfg.train.loss_chunk
    # the resolved config round-trips through the YAML written into the run directory
    assert from_dict(read_yaml_text(cfg.to_yaml())) == cfg
    if path.stem in PLANNED:  # the planner lists this config's layout among those that fit
        n_devices, memory = PLANNED[path.stem]
        devices = jax.devices()[:n_devices]
        sizes = cfg.mesh.sizes(n_devices)
        fits = mem.plan(model_cfg, devices, G, T, memory)
        want = (*sizes, m.remat, cfg.micro_batch_size())
        chunk = cfg.train.loss_chunk  # a chunk shorter than a fitting layout's holds fewer logits: fits too
        assert any((lay.data, lay.fsdp, lay.tensor, lay.remat, lay.micro_batch) == want
                   and (lay.loss_chunk == 0 or 0 < chunk <= lay.loss_chunk) for lay, _ in fits), want


def read_yaml_text(text):
    import yaml

    return yaml.safe_load(text)


def test_overrides_parse_as_yaml_scalars():
    cfg = load_config(None, ["train.steps=7", "optim.lr=1e-4", "mesh.shape=[1,-1,2]", "model.tokenizer=null",
                             "data.buckets=[64,128]", "run.export=false"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-4 and cfg.mesh.shape == (1, -1, 2)
    assert cfg.data.buckets == (64, 128) and cfg.run.export is False
    assert load_config(None, ["mesh.shape.fsdp=2"]).mesh.shape == (-1, 2, 1)
    assert load_config("demo", ["train.steps=3", "train.steps=3"]).train.steps == 3  # same value twice is fine


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=5"], "valid keys in train: ["),
    (["trian.steps=5"], "valid keys in the top level"),
    (["train.steps=five"], "train.steps='five' has type str, expected int"),
    (["optim.lr=[1]"], "expected float"),
    (["data.formatt=chat"], "valid keys"),
    (["train.steps=5", "train.steps=6"], "given twice"),
    (["mesh.shape={data: 2, pipeline: 2}"], "valid axes"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "not a multiple"),
    (["model.remat=sometimes"], "model.remat"),
])
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_impossible_mesh_is_a_config_error():
    with pytest.raises(ConfigError, match="needs 12 devices but 8"):
        shd.make_mesh((2, 3, 2), jax.devices())
    with pytest.raises(ConfigError, match="not divisible by 3"):
        shd.make_mesh((-1, 3, 1), jax.devices())


@pytest.mark.parametrize("overrides, message", [
    (["train.nope=1"], "unknown config key 'train.nope'"),
    (["train.seed=abc"], "train.seed='abc' has type str, expected int"),
    (["mesh.shape=[3,1,1]"], "mesh.shape"),
    (["data.train=/no/such/file.jsonl", "data.format=alpaca"], "/no/such/file.jsonl"),
    (["train.global_batch_size=6"], "do not split over the 8 data-parallel devices"),
])
def test_user_errors_exit_2_with_one_line_and_no_run_dir(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    config = write_tiny_yaml(tmp_path / "tiny.yaml", out, "train.steps=2")
    code = train.main(["--config", str(config), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_compilation_cache_is_on_by_default_and_configurable():
    """On unless turned off; the resume tests show a rerun loading the step from it."""
    from sft_jax.config import TrainSection

    assert TrainSection().compilation_cache == "~/.cache/sft_jax/xla"
    assert all(load_config(p).train.compilation_cache == "~/.cache/sft_jax/xla" for p in shipped_configs())
    assert load_config(None, ["train.compilation_cache=/tmp/x"]).train.compilation_cache == "/tmp/x"
    assert load_config(None, ["train.compilation_cache=null"]).train.compilation_cache is None


def test_a_user_error_exits_non_zero_from_the_real_command(tmp_path):
    """The in-process cases above through ``python -m sft_jax.train`` once: the exit status
    a shell sees, the one-line message, and no run directory."""
    from train_fixtures import train_cli

    out = tmp_path / "run"
    config = write_tiny_yaml(tmp_path / "tiny.yaml", out, "train.steps=2")
    done = train_cli(["--config", config, "data.train=/no/such/file.jsonl", "data.format=alpaca"], devices=None,
                     timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "/no/such/file.jsonl" in done.stderr
    assert not out.exists()
