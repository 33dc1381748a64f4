"""LoRA adapters in PEFT's format: import, forward, training, export, against peft in torch."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.adapters import lora
from sft_jax.models import hf_io
from sft_jax.models.family import family_of
from tests import hf_fixtures

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOKENS = np.array([[5, 17, 42, 99, 3, 250, 7, 8, 1, 77, 12, 13], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 100, 200]])


def peft_model(base, targets, r=4, alpha=8.0, rslora=False, seed=0):
    """A peft LoRA model on ``base`` with random nonzero A and B (B is zero at init)."""
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, conf)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def jax_logits(base_dir, adapter_dir, tokens=TOKENS):
    cfg, params = hf_io.load_hf(base_dir, dtype="float32")
    spec, adapters = lora.load_peft(adapter_dir, cfg)
    merged = lora.merge(params, jax.tree.map(jnp.asarray, adapters), spec)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    out = family_of(cfg).module(cfg).apply(merged, jnp.asarray(tokens), jnp.asarray(positions),
                                          jnp.ones(tokens.shape, jnp.int32))
    return np.asarray(out[0] if isinstance(out, tuple) else out, np.float32)[..., :cfg.vocab_size], spec


def llama_base():
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("family,targets,rslora", [("gpt2", ["c_attn"], False), ("gpt2", "all-linear", True),
                                                    ("llama", ["q_proj", "v_proj"], False)])
def test_peft_adapter_imports_with_peft_logits(tmp_path, family, targets, rslora):
    base = hf_fixtures.make_hf_model() if family == "gpt2" else llama_base()
    base.save_pretrained(tmp_path / "base")
    model = peft_model(base, targets, rslora=rslora)
    model.save_pretrained(tmp_path / "adapter")
    want = hf_fixtures.torch_logits(model, TOKENS)
    got, spec = jax_logits(tmp_path / "base", tmp_path / "adapter")
    with model.disable_adapter():
        base_logits = hf_fixtures.torch_logits(model, TOKENS)
    assert np.abs(base_logits - want).max() > 1e-2  # the adapter changes the model
    assert spec.rank == 4 and spec.rslora == rslora
    if targets == "all-linear":
        assert spec.modules == ["c_attn", "c_fc", "c_proj"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# --- training: the core's step on adapters against torch + peft + AdamW --------------------

def _lora_step(cfg, spec, optim, steps, mesh_shape, base, adapters0, n_micro=1):
    from sft_jax.adapters.objective import LoraObjective
    from sft_jax.core import mesh as shd
    from sft_jax.core import step as core
    from sft_jax.core.optimizer import make_optimizer
    from sft_jax.objectives import sft

    inner = sft.SFTLoss(cfg)
    inner.config = inner.tokenizer = inner.hf_dir = None
    inner.model_cfg = cfg
    objective = LoraObjective(inner, spec)
    tx, schedule = make_optimizer(optim, steps)
    n = int(np.prod(mesh_shape))
    mesh = shd.make_mesh(mesh_shape, jax.devices()[:n])
    _, shardings = core.state_shardings(objective.abstract_params(), tx, mesh)
    base_sh = shd.logical_shardings(mesh, family_of(cfg).param_shapes(cfg))
    frozen = (jax.device_put(base, base_sh), None)
    step = core.make_train_step(objective, tx, schedule, mesh=mesh, shardings=shardings, clip_norm=optim.clip_norm,
                                frozen_shardings=(base_sh, None), n_micro=n_micro)
    state = core.init_state(None, tx, shardings, params=jax.tree.map(jnp.array, adapters0))
    return step, state, frozen, mesh, schedule


def test_five_lora_steps_match_torch_peft_adamw():
    """5 optimizer steps of LoRA SFT (float32) vs peft + torch.optim.AdamW + clip_grad_norm_ on the
    same batches; the base is bit-equal after; step 0 is the base model's loss; a (2, 2, 2) mesh
    gives the one-device losses."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from sft_jax.config import OptimSection
    from sft_jax.core import mesh as shd
    from sft_jax.models.gpt2 import GPT2Config
    from sft_jax.objectives import sft
    from train_fixtures import fixed_batches, torch_adamw_steps

    cfg = GPT2Config.preset("tiny", vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0, dtype="float32")
    optim = OptimSection(lr=1e-2, warmup_steps=2, final_lr_fraction=0.1, weight_decay=0.1, clip_norm=0.5,
                         b1=0.9, b2=0.95, eps=1e-8)
    steps = 5
    spec = lora.resolve(cfg, 4, 8.0, False, "c_attn")
    base = family_of(cfg).init_params(cfg, jax.random.key(0))
    adapters0 = lora.init_adapters(cfg, spec, jax.random.key(1))
    base_copy = jax.tree.map(np.array, base)
    batches = fixed_batches(steps, rows=4, length=16, vocab=cfg.vocab_size, seed=1)

    def run(mesh_shape, n_micro=1, model_cfg=cfg):
        step, state, frozen, mesh, schedule = _lora_step(model_cfg, spec, optim, steps, mesh_shape, base, adapters0,
                                                         n_micro)
        losses = []
        for b in batches:
            state, m = step(state, shd.global_batch(b, mesh, 4), frozen)
            losses.append(float(m["loss"]))
        return losses, state, frozen, schedule

    jax_losses, state, frozen, schedule = run((1, 1, 1))
    # the frozen base is untouched, and B = 0 makes step 0 the base model's loss exactly
    for a, b in zip(jax.tree.leaves(jax.device_get(frozen[0])), jax.tree.leaves(base_copy)):
        np.testing.assert_array_equal(a, b)
    b0 = {k: jnp.asarray(v) for k, v in batches[0].items()}
    base_loss = float(sft.summed_nll(family_of(cfg).module(cfg), base, b0, 0) / b0["weights"].sum())
    assert jax_losses[0] == pytest.approx(base_loss, rel=1e-6)

    hf_cfg = transformers.GPT2Config(**{k: v for k, v in cfg.to_hf_config().items()
                                        if k not in ("architectures", "model_type", "torch_dtype")})
    model = transformers.GPT2LMHeadModel(hf_cfg).float()
    sd = {k: torch.from_numpy(v.copy()) for k, v in hf_io.to_hf_state_dict(base, cfg).items()}
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8.0, target_modules=["c_attn"], lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    start = lora.peft_state_dict(cfg, spec, adapters0)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in start.items():
            named[key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")].copy_(
                torch.from_numpy(value))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 2 * cfg.n_layer
    torch_losses, _ = torch_adamw_steps(model, [{"params": trained, "weight_decay": optim.weight_decay}], optim,
                                        schedule, batches, clip_params=trained)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    assert jax_losses[-1] < jax_losses[0]
    got = lora.peft_state_dict(cfg, spec, state.params)
    from peft import get_peft_model_state_dict

    want = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    assert set(got) == set(want)
    for key in got:
        np.testing.assert_allclose(got[key], want[key], atol=5e-5, rtol=0, err_msg=key)

    mesh_losses, _, _, _ = run((2, 2, 2))
    np.testing.assert_allclose(mesh_losses, jax_losses, rtol=1e-5)
    # the core's step features under adapters: 2 accumulated micro-batches, full remat
    micro_losses, _, _, _ = run((1, 1, 1), n_micro=2, model_cfg=cfg.replace(remat="full"))
    np.testing.assert_allclose(micro_losses, jax_losses, rtol=1e-5)


# --- a LoRA SFT run through the command line: export, checkpoints, resume, bad input --------

RUN_STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One tiny LoRA SFT run on a tiny HF GPT-2 (adapter + merged export), and its config."""
    from train_fixtures import train_cli, write_tiny_yaml

    root = tmp_path_factory.mktemp("lora_run")
    base = hf_fixtures.save_hf_model(hf_fixtures.make_hf_model(seed=0), root / "base")
    hf_fixtures.train_tokenizer().save_pretrained(base)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."}
            for i in range(60)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(name, *extra):
        return write_tiny_yaml(root / f"{name}.yaml", root / name, f"model.init_from={base}", f"data.train={data}",
                               "data.format=alpaca", "data.eval_fraction=0", f"train.steps={RUN_STEPS}",
                               f"checkpoint.every={EVERY}", "checkpoint.keep=10", "model.dtype=float32",
                               "model.lora.rank=4", "model.lora.alpha=8", "optim.lr=1e-2", *extra)

    done = train_cli(["--config", config("straight", "run.export=true", "run.export_merged=true")], devices=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified in peft" in done.stdout, done.stdout
    return root, base, config


def _peft_on(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()


def test_exported_adapter_loads_in_peft_and_merged_export_equals_merge_and_unload(lora_run):
    from transformers import AutoModelForCausalLM

    root, base, _ = lora_run
    adapter = root / "straight" / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["target_modules"], conf["use_rslora"], conf["fan_in_fan_out"],
            conf["task_type"], conf["base_model_name_or_path"]) == (4, 8.0, ["c_attn"], False, True, "CAUSAL_LM",
                                                                   str(base))
    model = _peft_on(base, adapter)
    tokens = TOKENS % 300
    with_adapter = hf_fixtures.torch_logits(model, tokens)
    with model.disable_adapter():
        assert np.abs(hf_fixtures.torch_logits(model, tokens) - with_adapter).max() > 1e-4  # it trained
    got, _ = jax_logits(base, adapter, tokens)
    np.testing.assert_allclose(got, with_adapter, atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(root / "straight" / "hf")).eval()
    unloaded = model.merge_and_unload()
    np.testing.assert_allclose(hf_fixtures.torch_logits(merged, tokens), hf_fixtures.torch_logits(unloaded, tokens),
                               atol=1e-5, rtol=1e-5)


def test_convert_merge_of_checkpoint_or_adapter_equals_merge_and_unload(lora_run, tmp_path, capsys):
    """``convert merge`` from the run's checkpoint (base found by its recorded path and sha256)
    and from the exported PEFT dir: both equal peft's ``merge_and_unload()``; a full-model
    checkpoint or another base is one error line, nothing written."""
    from sft_jax import convert
    from transformers import AutoModelForCausalLM

    root, base, _ = lora_run
    tokens = TOKENS % 300
    want = hf_fixtures.torch_logits(_peft_on(base, root / "straight" / "adapter").merge_and_unload(), tokens)
    run = root / "straight"
    for name, src in (("from_checkpoint", run / "checkpoints"), ("from_adapter", run / "adapter")):
        assert convert.main(["merge", str(src), str(tmp_path / name)]) == 0
        assert "verified in peft" in capsys.readouterr().out
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / name)).eval()
        np.testing.assert_allclose(hf_fixtures.torch_logits(merged, tokens), want, atol=1e-5, rtol=1e-5, err_msg=name)
    assert convert.main(["hf-to-orbax", str(base), str(tmp_path / "full")]) == 0
    other = hf_fixtures.save_hf_model(hf_fixtures.make_hf_model(seed=5), tmp_path / "other")
    for argv, needle in ((["merge", str(tmp_path / "full"), str(tmp_path / "bad")], "orbax-to-hf"),
                         (["merge", str(run / "checkpoints"), str(tmp_path / "bad"), "--base", str(other)],
                          str(other))):
        capsys.readouterr()
        assert convert.main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "bad").exists()


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoint_holds_adapters_and_base_identity_only(lora_run):
    from sft_jax.core import checkpoint as ckpt

    root, base, _ = lora_run
    ckpts = root / "straight" / "checkpoints"
    restored = ckpt.restore(ckpts, step=RUN_STEPS, with_opt_state=True)
    leaves = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(restored["params"])}
    assert leaves and all("lora_a_kernel" in k or "lora_b_kernel" in k for k in leaves), leaves
    assert restored["train_state"]["lora_base"]["path"] == str(base)
    adapter_bytes = (root / "straight" / "adapter" / "adapter_model.safetensors").stat().st_size
    base_bytes = (base / "model.safetensors").stat().st_size
    step_bytes = _dir_bytes(ckpts / str(RUN_STEPS))
    # adapters + 2 Adam moments + metadata (tokenizer, config): far below the base's weights
    assert step_bytes < 3 * adapter_bytes + 200_000 < base_bytes, (step_bytes, adapter_bytes, base_bytes)


@pytest.mark.parametrize("name,fault,exit_code,saved", [("killed", f"step:{EVERY}:after_save", -9, EVERY),
                                                        ("preempted", "step:1:sigterm", 0, 1)])
def test_interrupted_lora_run_and_rerun_end_bit_equal(lora_run, name, fault, exit_code, saved):
    """SIGKILL once step 2's checkpoint is committed, or a preemption notice (SIGTERM) after step
    1, between periodic saves (the run saves that step and exits 0): the same command again ends
    with the uninterrupted run's adapters, Adam state and loss."""
    from sft_jax.core import checkpoint as ckpt
    from train_fixtures import assert_trees_equal, losses, train_cli

    root, _, config = lora_run
    cfg = config(name)
    first = train_cli(["--config", cfg], env_extra={"SFT_JAX_FAULT": fault}, devices=None)
    assert first.returncode == exit_code, first.stdout + first.stderr
    assert ckpt.latest_step(root / name / "checkpoints") == saved
    second = train_cli(["--config", cfg], devices=None)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from step {saved}" in second.stderr
    want = ckpt.restore(root / "straight" / "checkpoints", step=RUN_STEPS, with_opt_state=True)
    got = ckpt.restore(root / name / "checkpoints", step=RUN_STEPS, with_opt_state=True)
    assert losses(root / name)[RUN_STEPS] == losses(root / "straight")[RUN_STEPS]
    assert_trees_equal(jax.device_get((got["params"], got["opt_state"])),
                       jax.device_get((want["params"], want["opt_state"])))


def test_resume_on_another_base_is_refused_naming_both(lora_run, tmp_path):
    from train_fixtures import train_cli

    root, base, config = lora_run
    other = hf_fixtures.save_hf_model(hf_fixtures.make_hf_model(seed=5), tmp_path / "other")
    hf_fixtures.train_tokenizer().save_pretrained(other)
    cfg = config("straight", f"model.init_from={other}", f"train.steps={RUN_STEPS + 1}")
    out = train_cli(["--config", cfg], devices=None)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(base) in lines[0] and str(other) in lines[0], out.stderr


def _one_error(capsys, argv, *needles):
    from sft_jax import train

    assert train.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_lora_input_is_one_error_line_and_writes_nothing(lora_run, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    root, base, config = lora_run
    out = tmp_path / "run"
    cfg = str(config("bad"))
    run_dir = [f"run.output_dir={out}"]
    _one_error(capsys, ["--config", cfg, *run_dir, "model.lora.targets=q_proj"], "q_proj", "c_attn, c_fc, c_proj")
    _one_error(capsys, ["--config", cfg, *run_dir, "model.lora.rank=0", "model.lora.targets=c_fc"], "model.lora.rank")
    _one_error(capsys, ["--config", cfg, *run_dir, "model.lora.rank=-1"], "model.lora.rank")
    # an adapter made for a wider GPT-2: shapes do not fit
    wide = get_peft_model(hf_fixtures.make_hf_model(n_embd=32), LoraConfig(r=2, target_modules=["c_attn"]))
    wide.save_pretrained(tmp_path / "wide")
    _one_error(capsys, ["--config", cfg, *run_dir, f"model.adapter={tmp_path / 'wide'}"], "needs")
    # an adapter of another family
    llama = get_peft_model(llama_base(), LoraConfig(r=2, target_modules=["q_proj"]))
    llama.save_pretrained(tmp_path / "llama")
    _one_error(capsys, ["--config", cfg, *run_dir, f"model.adapter={tmp_path / 'llama'}"], "does not fit", "gpt2")
    assert not out.exists()


def _torch_sequence_logps(model, batch) -> np.ndarray:
    """Summed response log-probs of every sequence (segment) of the rows, each run alone in torch,
    in float64 from the logits on (the model's dtype before)."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        for s in range(1, batch["reward_index"].shape[1] + 1):
            where = np.nonzero(batch["segment_ids"][r] == s)[0]
            if not len(where):
                continue
            tokens = torch.as_tensor(batch["tokens"][r, where][None], dtype=torch.long)
            positions = torch.as_tensor(batch["positions"][r, where][None], dtype=torch.long)
            with torch.no_grad():
                logits = model(input_ids=tokens, position_ids=positions).logits[0].double()
            logp = torch.log_softmax(logits, -1).numpy()
            targets, weights = batch["targets"][r, where], batch["weights"][r, where].astype(np.float64)
            out.append(float(np.sum(logp[np.arange(len(where)), targets] * weights)))
    return np.asarray(out)


def test_dpo_with_adapters_reference_is_the_base_and_margins_match_peft(lora_run):
    """DPO on adapters: step 0 is log 2 (policy == reference), and the held-out margins equal
    those recomputed in torch with policy = base + exported adapter, reference = base, in float64
    (the exact values): their mean to 1e-5 relative.

    The floor is float32's: a margin is beta x a difference of four summed log-probs of about
    -35 (ulp 3.8e-6), so rounding the exact log-probs to float32 alone moves a mean margin of
    0.0023 (lr 1e-2) by 3e-5 relative, and torch + peft in float32 is 1.8e-5 off too; at lr 1e-1
    the mean margin is 0.0138 and that rounding moves it 4e-6."""
    import math

    from sft_jax.core.loop import run
    from sft_jax.data.preference import preference_eval_batches
    from sft_jax.demos.pairs import demo_pair_examples, make_pairs, write_jsonl
    from sft_jax.objectives.dpo import DPOObjective
    from train_fixtures import metrics, tiny_config
    from transformers import AutoModelForCausalLM

    root, base, _ = lora_run
    train, held_out = demo_pair_examples(64, 12)
    train_file, eval_file = write_jsonl(make_pairs(train), root / "p.jsonl"), write_jsonl(make_pairs(held_out),
                                                                                        root / "pe.jsonl")
    out = root / "dpo"
    cfg = tiny_config(out, f"model.init_from={base}", f"data.train={train_file}", f"data.eval={eval_file}",
                      "data.format=preference", "train.steps=3", "mesh.shape=[1,1,1]", "run.export=true",
                      "dpo.kl_prompts=0", "model.dtype=float32", "model.lora.rank=4", "optim.lr=1e-1")
    result = run(cfg, DPOObjective, devices=jax.devices()[:1])
    assert result.status == "done"
    assert metrics(out)[0]["last_loss"] == pytest.approx(math.log(2), rel=1e-6)
    (final,) = metrics(out, "eval")

    from sft_jax.core.setup import model_and_tokenizer

    model_cfg, tokenizer, hf_dir = model_and_tokenizer(cfg)
    objective = DPOObjective(cfg, model_cfg, tokenizer, hf_dir)
    eval_ds = objective.build_data().eval_data
    d = cfg.data
    policy = _peft_on(base, out / "adapter").double()
    reference = AutoModelForCausalLM.from_pretrained(str(base)).double().eval()
    margins = []
    for batch in preference_eval_batches(eval_ds, batch_size=cfg.micro_batch_size(), max_length=d.max_length,
                                         mode=d.batching, buckets=d.buckets, max_segments=d.max_segments_per_row):
        policy_logps, reference_logps = _torch_sequence_logps(policy, batch), _torch_sequence_logps(reference, batch)
        ratio = policy_logps - reference_logps
        margins += list(cfg.dpo.beta * (ratio[0::2] - ratio[1::2]))
    assert len(margins) == len(held_out)
    assert abs(float(np.mean(margins))) > 1e-2  # the adapters moved the policy off the reference
    assert final["eval_margin"] == pytest.approx(float(np.mean(margins)), rel=1e-5)


def test_generate_with_adapter_equals_the_merged_export(lora_run, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from sft_jax import generate

    root, base, _ = lora_run
    args = ["--prompt", "Add 3 and 4.", "--max-new-tokens", "8", "--raw"]
    assert generate.main(["--model", str(base), "--adapter", str(root / "straight" / "adapter"), *args]) == 0
    with_adapter = capsys.readouterr().out
    assert generate.main(["--model", str(root / "straight" / "hf"), *args]) == 0
    assert with_adapter == capsys.readouterr().out
    llama = get_peft_model(llama_base(), LoraConfig(r=2, target_modules=["q_proj"]))
    llama.save_pretrained(tmp_path / "llama")
    assert generate.main(["--model", str(base), "--adapter", str(tmp_path / "llama"), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "does not fit this gpt2 model" in err[0], err


def _peft_greedy(model, tokenizer, ids, new_tokens) -> str:
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=hf_fixtures.EOS_ID,
                         eos_token_id=hf_fixtures.EOS_ID)
    return tokenizer.decode([t for t in out[0, len(ids):].tolist() if t != hf_fixtures.EOS_ID],
                            skip_special_tokens=True)


def test_chat_and_generate_with_adapter_equal_peft_greedy(lora_run, tmp_path, monkeypatch, capsys):
    """``chat`` and ``generate --model BASE --adapter DIR`` print peft's greedy continuation
    (base + adapter in torch) of the same templated conversation and raw prompt."""
    import io
    import shutil
    import sys

    from sft_jax import chat, generate
    from transformers import AutoTokenizer

    root, base, _ = lora_run
    adapter, new = root / "straight" / "adapter", 8
    templated = Path(shutil.copytree(base, tmp_path / "base"))  # the base, with a chat template
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.chat_template = hf_fixtures.CHAT_TEMPLATE
    tokenizer.save_pretrained(str(templated))
    model = _peft_on(templated, adapter)
    messages = [{"role": "user", "content": "Add 3 and 4."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want_chat = _peft_greedy(model, tokenizer, tokenizer.encode(text, add_special_tokens=False), new)
    want_raw = _peft_greedy(model, tokenizer, tokenizer.encode("Add 3 and 4.", add_special_tokens=False), new)
    assert want_chat and want_raw
    monkeypatch.setattr(sys, "stdin", io.StringIO("Add 3 and 4.\n"))
    assert chat.main(["--model", str(templated), "--adapter", str(adapter), "--max-new-tokens", str(new)]) == 0
    assert capsys.readouterr().out == want_chat.replace("\n", " ") + "\n"
    assert generate.main(["--model", str(templated), "--adapter", str(adapter), "--prompt", "Add 3 and 4.",
                          "--max-new-tokens", str(new), "--raw"]) == 0
    assert capsys.readouterr().out == want_raw + "\n"


def test_lora_checkpoint_resumed_as_full_fine_tuning_is_refused(lora_run):
    from train_fixtures import train_cli

    root, _, config = lora_run
    cfg = config("straight", "model.lora.rank=0", "model.lora.alpha=16", f"train.steps={RUN_STEPS + 1}")
    out = train_cli(["--config", cfg], devices=None)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "holds LoRA adapters" in lines[0], out.stderr
