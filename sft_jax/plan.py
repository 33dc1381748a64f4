"""``python -m sft_jax.plan --preset gpt2-xl --devices 8 --memory 16GB [--seq 1024] [--global-batch 64] [--verify 3]``

The layouts (fsdp and tensor sizes, remat policy, micro-batch, loss chunk) whose predicted
bytes per device fit, ranked by the analytic model (sft_jax.analysis.memory); the top
``--verify`` are lowered and compiled on abstract shapes (nothing allocated; fake CPU devices)
and XLA's memory_analysis() printed beside the prediction. Then claim 6's arithmetic."""

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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.devices < 1 or args.seq < 1 or args.global_batch < 1:
        print("sft_jax.plan: --devices, --seq and --global-batch must be >= 1", file=sys.stderr)
        return 2
    # fake CPU devices, set before jax is imported (a no-op if the caller's jax already has them)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from sft_jax.analysis import memory as mem
    from sft_jax.models.family import config_for_preset, preset_names

    try:
        memory_bytes = mem.parse_bytes(args.memory)
        if args.preset not in preset_names():
            raise ValueError(f"--preset {args.preset!r}: choose one of {preset_names()}")
        cfg = config_for_preset(args.preset, max_position_embeddings=max(1024, args.seq), dtype=args.dtype)
    except ValueError as e:
        print(f"sft_jax.plan: {e}", file=sys.stderr)
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
    fits = mem.plan(cfg, devices, args.global_batch, args.seq, memory_bytes)
    if not fits:
        print(f"no layout fits {mem.HEADROOM:.0%} of {memory_bytes / G:.2f} GB per device; add devices or memory, "
              "or shorten --seq")
    else:
        print(f"{len(fits)} layouts fit (predicted <= {mem.HEADROOM:.0%} of memory), best first:\n")
        print("| # | data | fsdp | tensor | remat | micro-batch | loss chunk | predicted GB/device | state | grads | "
              "activations | logits | relative time |")
        print("|---" * 13 + "|")
        for i, (lay, p) in enumerate(fits[:args.show], 1):
            print(f"| {i} | {lay.data} | {lay.fsdp} | {lay.tensor} | {lay.remat} | {lay.micro_batch} | "
                  f"{lay.loss_chunk or '-'} | {p['total'] / G:.2f} | {(p['params'] + p['adam']) / G:.2f} | "
                  f"{p['grads'] / G:.2f} | {p['activations'] / G:.2f} | {p['logits'] / G:.2f} | {mem.cost(lay):.2f} |")
    for i, (lay, p) in enumerate(fits[:args.verify], 1):
        xla = mem.compiled_memory(cfg, lay, mem.make_mesh(lay, devices))
        print(f"\nverify #{i} (compiled for the CPU backend, not the accelerator: temp sizes differ there):")
        print(f"  arguments: predicted {p['arguments']:,} B, XLA argument_size_in_bytes {xla['argument_size_in_bytes']:,} B"
              f" ({'equal' if p['arguments'] == xla['argument_size_in_bytes'] else 'differ'})")
        print(f"  gradients + activations + logits: predicted {p['temp']:,} B, XLA temp_size_in_bytes "
              f"{xla['temp_size_in_bytes']:,} B, ratio {p['temp'] / max(xla['temp_size_in_bytes'], 1):.2f}")
    print("\nclaim 6 arithmetic (weights + gradients + Adam, before activations):\n")
    print(mem.claim_table_markdown(mem.claim_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
