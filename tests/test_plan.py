"""The memory model and planner: the train state's bytes equal XLA's argument bytes exactly
(compiled on abstract shapes, nothing allocated); claim 6's arithmetic; the planner's CLI."""

from __future__ import annotations

import jax
import pytest

from sft_jax import plan
from sft_jax.analysis import memory as mem
from sft_jax.models.gpt2 import GPT2Config


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-xl"])
def test_state_bytes_equal_xla_argument_bytes(preset):
    """B = 2, T = 256 on fsdp = 2 x tensor = 4 of the 8 fake devices. The temp ratio is printed, not
    asserted: the CPU backend's temp buffers are not the accelerator's."""
    cfg = GPT2Config.preset(preset, dtype="bfloat16")
    layout = mem.Layout(data=1, fsdp=2, tensor=4, remat="full", global_batch=2, micro_batch=2, seq=256)
    mesh = mem.make_mesh(layout, jax.devices())
    predicted = mem.predict(cfg, layout, mem.state_bytes(cfg, mesh))
    xla = mem.compiled_memory(cfg, layout, mesh)
    assert predicted["arguments"] == xla["argument_size_in_bytes"]
    # parameters and both Adam moments are the same float32 shards
    assert predicted["adam"] == 2 * predicted["params"]
    print(f"\n{preset}: predicted temp / XLA temp (CPU) = {predicted['temp'] / xla['temp_size_in_bytes']:.2f}")


def test_claim_arithmetic():
    small, xl = mem.claim_table()
    assert xl["N"] == 1_557_611_200
    assert [round(small[k] / 1e9, 2) for k in ("weights_fp32", "weights_bf16", "grads_fp32", "adam", "total")] == \
        [6.0, 3.0, 6.0, 12.0, 24.0]
    assert [round(xl[k] / 1e9, 2) for k in ("weights_fp32", "weights_bf16", "grads_fp32", "adam")] == \
        [6.23, 3.12, 6.23, 12.46]
    assert round(xl["total"] / 1e9, 1) == 24.9


def test_parse_bytes():
    assert mem.parse_bytes("16GB") == 16 * 10 ** 9 and mem.parse_bytes("1GiB") == 2 ** 30
    with pytest.raises(ValueError, match="16 gigs"):
        mem.parse_bytes("16 gigs")


def test_plan_cli_lists_layouts_that_fit(capsys):
    assert plan.main(["--preset", "gpt2", "--devices", "8", "--memory", "16GB", "--seq", "256",
                      "--global-batch", "16", "--verify", "0"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit" in out and "| 1 |" in out and "24.00 GB" in out
    fits = mem.plan(GPT2Config.preset("gpt2", dtype="bfloat16"), jax.devices(), 16, 256, 16 * 10 ** 9)
    assert all(p["total"] <= mem.HEADROOM * 16e9 for _, p in fits)
    assert [mem.cost(lay) for lay, _ in fits] == sorted(mem.cost(lay) for lay, _ in fits)


def test_plan_cli_bad_memory_is_one_line(capsys):
    assert plan.main(["--preset", "gpt2", "--devices", "8", "--memory", "lots"]) == 2
    assert "--memory 'lots'" in capsys.readouterr().err


def test_llama_8b_plan_lists_layouts_whose_state_bytes_equal_xla(capsys):
    """``plan --preset llama3.1-8b --devices 8 --memory 80GB``: the layouts listed fit, and the top
    one's predicted parameter + Adam bytes equal XLA's argument_size_in_bytes for the compiled step
    on abstract shapes (grouped-query attention, untied 128k vocabulary); short rows keep it cheap."""
    from sft_jax.models.family import config_for_preset

    assert plan.main(["--preset", "llama3.1-8b", "--devices", "8", "--memory", "80GB", "--seq", "256",
                      "--global-batch", "8", "--verify", "1"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit" in out
    import re

    (predicted, compiled), = re.findall(r"arguments: predicted ([\d,]+) B, XLA argument_size_in_bytes ([\d,]+) B", out)
    assert predicted == compiled and int(predicted.replace(",", "")) > 10 ** 9  # float32 parameters + Adam: 12 bytes a parameter, split 8 ways
    cfg = config_for_preset("llama3.1-8b", dtype="bfloat16")
    (_, state), *_ = mem.plan(cfg, jax.devices(), 8, 256, 80 * 10 ** 9)
    assert state["adam"] == 2 * state["params"]


@pytest.mark.parametrize("preset,targets", [("tiny", "c_attn"), ("llama_tiny", "all-linear")])
def test_lora_state_bytes_equal_xla_argument_bytes(preset, targets):
    """LoRA r = 4, fsdp = 2 x tensor = 2, B = 4 in 2 micro-batches: the frozen base (bf16) +
    adapters (float32) + Adam + scalars + batch equal XLA's argument bytes for the compiled LoRA
    step; the base costs 2 bytes a parameter and nothing else, the adapters 4 + 8 (Adam)."""
    from sft_jax.adapters import lora
    from sft_jax.models.family import config_for_preset

    cfg = config_for_preset(preset, dtype="bfloat16")
    spec = lora.resolve(cfg, 4, 8.0, False, targets)
    layout = mem.Layout(data=1, fsdp=2, tensor=2, remat="none", global_batch=4, micro_batch=2, seq=32)
    mesh = mem.make_mesh(layout, jax.devices())
    state = mem.state_bytes(cfg, mesh, spec)
    predicted = mem.predict(cfg, layout, state)
    assert predicted["arguments"] == mem.compiled_memory(cfg, layout, mesh, spec)["argument_size_in_bytes"]
    assert state["frozen"] == mem.state_bytes(cfg, mesh)["params"] // 2  # the float32 masters' shards, in bf16
    assert predicted["adam"] == 2 * predicted["params"] == predicted["grads"]
    if preset == "tiny":
        one = mem.state_bytes(cfg, mem.make_mesh(mem.Layout(1, 1, 1, "full", 4, 4, 32), jax.devices()), spec)
        assert one["params"] == cfg.n_layer * 4 * (cfg.n_embd + 3 * cfg.n_embd) * 4  # A (r, D), B (3D, r)
        assert one["lowrank"] == state["lowrank"] == cfg.n_layer * 4  # x Aᵀ: r per target and layer, per token
        assert state["params"] < one["params"]


def test_plan_cli_lists_lora_layouts_beside_full_fine_tuning(capsys):
    """``plan --lora-rank 8 --lora-targets all-linear``: a table for full fine-tuning, then one for
    the adapters whose layouts hold the base in bf16 and far fewer trained bytes."""
    assert plan.main(["--preset", "llama_tiny", "--devices", "2", "--memory", "1GB", "--seq", "32",
                      "--global-batch", "2", "--verify", "0", "--show", "2", "--lora-rank", "8",
                      "--lora-targets", "all-linear"]) == 0
    out = capsys.readouterr().out
    full, lora_part = out.split("## LoRA r = 8 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    assert "## full fine-tuning" in full and "layouts fit" in full and "layouts fit" in lora_part
    row = next(line for line in lora_part.splitlines() if line.startswith("| 1 |")).split("|")
    full_row = next(line for line in full.splitlines() if line.startswith("| 1 |")).split("|")
    assert row[9].strip() != "-" and full_row[9].strip() == "-"  # the frozen base column
    assert float(row[10]) < float(full_row[10]) / 4  # trained parameter bytes


def test_plan_cli_unknown_lora_target_is_one_line(capsys):
    assert plan.main(["--preset", "tiny", "--devices", "8", "--memory", "16GB", "--lora-rank", "4",
                      "--lora-targets", "q_proj"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-targets" in err[0] and "c_attn, c_fc, c_proj" in err[0], err
