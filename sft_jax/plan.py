"""``python -m sft_jax.plan --preset gpt2-xl --devices 8 --memory 16GB [--seq 1024] [--global-batch 64] [--verify 3] [--lora-rank R [--lora-targets c_attn]]``

The layouts (fsdp and tensor sizes, remat policy, micro-batch, loss chunk) whose predicted
bytes per device fit, ranked by the analytic model (sft_jax.analysis.memory); the top
``--verify`` are lowered and compiled on abstract shapes (nothing allocated; fake CPU devices)
and XLA's memory_analysis() printed beside the prediction. With ``--lora-rank`` the layouts of
LoRA adapters on a frozen base (in the compute dtype) follow those of full fine-tuning. Then
claim 6's arithmetic."""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sft_jax.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="model preset of any family: gpt2, gpt2-medium, gpt2-large, "
                                                   "gpt2-xl, ...")
    p.add_argument("--devices", type=int, required=True, help="accelerators the run will have")
    p.add_argument("--memory", required=True, help="memory per device, e.g. 16GB (1e9 bytes) or 80GiB")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row (default 1024)")
    p.add_argument("--global-batch", type=int, default=64, help="rows per optimizer step (default 64)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    p.add_argument("--verify", type=int, default=3, help="compile the top N layouts (default 3; 0 = none)")
    p.add_argument("--show", type=int, default=10, help="layouts listed (default 10)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="also list LoRA layouts: adapters of rank R on a frozen base "
                        "(default 0: full fine-tuning only)")
    p.add_argument("--lora-targets", default="",
                   help="modules the adapters target, comma-separated as PEFT names them, or all-linear "
                        "(default: the family's, as model.lora.targets)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.devices < 1 or args.seq < 1 or args.global_batch < 1 or args.lora_rank < 0:
        print("sft_jax.plan: --devices, --seq and --global-batch must be >= 1, --lora-rank >= 0", file=sys.stderr)
        return 2
    # fake CPU devices, set before jax is imported (a no-op if the caller's jax already has them)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from sft_jax.adapters import lora
    from sft_jax.analysis import memory as mem
    from sft_jax.models.family import config_for_preset, preset_names

    try:
        memory_bytes = mem.parse_bytes(args.memory)
        if args.preset not in preset_names():
            raise ValueError(f"--preset {args.preset!r}: choose one of {preset_names()}")
        cfg = config_for_preset(args.preset, max_position_embeddings=max(1024, args.seq), dtype=args.dtype)
        # alpha and rsLoRA scale the update, they change no byte: any value serves
        spec = lora.resolve(cfg, args.lora_rank, 2 * args.lora_rank, False, args.lora_targets) \
            if args.lora_rank else None
    except ValueError as e:  # AdapterError too: an unknown module, listed with the family's
        print(f"sft_jax.plan: {str(e).replace('model.lora.targets', '--lora-targets')}", file=sys.stderr)
        return 2
    devices = jax.devices()
    if len(devices) < args.devices:
        print(f"sft_jax.plan: jax has {len(devices)} devices, not {args.devices} (import jax after setting "
              "XLA_FLAGS, or run as python -m sft_jax.plan)", file=sys.stderr)
        return 2
    devices = devices[:args.devices]
    G, GiB = mem.GB, mem.GIB
    print(f"{args.preset}: N = {cfg.num_params():,} parameters; {args.devices} devices x {memory_bytes / G:.2f} GB "
          f"({memory_bytes / GiB:.2f} GiB); T = {args.seq}, {args.global_batch} rows per step, {args.dtype}\n")
    methods = [("full fine-tuning", None)]
    if spec is not None:
        methods.append((f"LoRA r = {spec.rank} on {', '.join(spec.modules)}, base frozen in {args.dtype}", spec))
    for title, method_spec in methods:
        print(f"## {title}\n")
        fits = mem.plan(cfg, devices, args.global_batch, args.seq, memory_bytes, method_spec)
        print_layouts(fits, memory_bytes, args.show)
        print_verified(cfg, fits[:args.verify], devices, method_spec)
        print()
    print("claim 6 arithmetic (weights + gradients + Adam, before activations):\n")
    print(mem.claim_table_markdown(mem.claim_table()))
    return 0


def print_layouts(fits, memory_bytes: int, show: int) -> None:
    """The table of layouts that fit: predicted bytes per device, by what holds them (the frozen
    base only under LoRA; parameters, gradients and Adam are then the adapters')."""
    from sft_jax.analysis import memory as mem

    G = mem.GB
    if not fits:
        print(f"no layout fits {mem.HEADROOM:.0%} of {memory_bytes / G:.2f} GB per device; add devices or memory, "
              "or shorten --seq")
        return
    print(f"{len(fits)} layouts fit (predicted <= {mem.HEADROOM:.0%} of memory), best first:\n")
    print("| # | data | fsdp | tensor | remat | micro-batch | loss chunk | predicted GB/device | frozen base | "
          "params | grads | Adam | activations | logits | relative time |")
    print("|---" * 15 + "|")
    for i, (lay, p) in enumerate(fits[:show], 1):
        frozen = f"{p['frozen'] / G:.2f}" if p.get("frozen") else "-"
        print(f"| {i} | {lay.data} | {lay.fsdp} | {lay.tensor} | {lay.remat} | {lay.micro_batch} | "
              f"{lay.loss_chunk or '-'} | {p['total'] / G:.2f} | {frozen} | {p['params'] / G:.4f} | "
              f"{p['grads'] / G:.4f} | {p['adam'] / G:.4f} | {p['activations'] / G:.2f} | {p['logits'] / G:.2f} | "
              f"{mem.cost(lay):.2f} |")


def print_verified(cfg, fits, devices, spec) -> None:
    """The top layouts compiled on abstract shapes: XLA's argument and temp bytes beside the prediction."""
    from sft_jax.analysis import memory as mem

    for i, (lay, p) in enumerate(fits, 1):
        xla = mem.compiled_memory(cfg, lay, mem.make_mesh(lay, devices), spec)
        print(f"\nverify #{i} (compiled for the CPU backend, not the accelerator: temp sizes differ there):")
        print(f"  arguments: predicted {p['arguments']:,} B, XLA argument_size_in_bytes {xla['argument_size_in_bytes']:,} B"
              f" ({'equal' if p['arguments'] == xla['argument_size_in_bytes'] else 'differ'})")
        extra = " + the adapters' low-rank activations" if spec is not None else ""
        print(f"  gradients + activations + logits{extra}: predicted {p['temp']:,} B, XLA temp_size_in_bytes "
              f"{xla['temp_size_in_bytes']:,} B, ratio {p['temp'] / max(xla['temp_size_in_bytes'], 1):.2f}")


if __name__ == "__main__":
    sys.exit(main())
