"""Profile the trainer's step and sum device-op time by op name.

    python benchmarks/profile_step.py --preset gpt2-large --batch 8 --rows packed \
        --attention cudnn_bias,auto --out /tmp/prof

For each attention path: compile and warm the step up (the bench's own setup,
``sft_jax.bench.jax_step_fn``), then trace ``--steps`` steps with
``jax.profiler.trace(dir, create_perfetto_trace=True)`` and sum the device time of every op
in the resulting ``perfetto_trace.json.gz`` by name (xprof is not needed). "Before" (the
cuDNN-bias path) and "after" (the fused path) come from the same run.

``summarise`` reads any Chrome/Perfetto JSON trace: complete events (``"ph": "X"``) on the
processes whose name matches ``--device`` (default: GPU/TPU device streams; on CPU the
XLA ops run on ``/host:CPU``) are summed by event name.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

DEVICE_PROCESSES = r"^/device:(GPU|TPU)"


def load_trace(path: str | Path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def summarise(trace: dict, device: str = DEVICE_PROCESSES, top: int = 25) -> dict:
    """{"total_us", "ops": [{"name", "us", "count", "share"}, ...] (most time first, ``top``
    of them), "processes": names matched}. Durations are the events' ``dur`` (microseconds)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pattern = re.compile(device)
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    pids = {pid for pid, name in names.items() if pattern.search(name)}
    time_by_op: dict = collections.Counter()
    count_by_op: dict = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e:
            time_by_op[e["name"]] += float(e["dur"])
            count_by_op[e["name"]] += 1
    total = sum(time_by_op.values())
    ops = [{"name": n, "us": us, "count": count_by_op[n], "share": us / total if total else 0.0}
           for n, us in time_by_op.most_common(top)]
    return {"total_us": total, "ops": ops, "processes": sorted(names[p] for p in pids)}


def summary_markdown(summary: dict, title: str, steps: int = 1) -> str:
    lines = [f"### {title}", "",
             f"device time {summary['total_us'] / 1e3 / max(steps, 1):.2f} ms per step "
             f"(processes: {', '.join(summary['processes']) or 'none matched'})", "",
             "| op | ms per step | share | calls |", "| --- | ---: | ---: | ---: |"]
    for op in summary["ops"]:
        lines.append(f"| `{op['name'][:80]}` | {op['us'] / 1e3 / max(steps, 1):.3f} | {op['share']:.1%} | {op['count']} |")
    return "\n".join(lines)


def find_trace(directory: str | Path) -> Path:
    found = sorted(Path(directory).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}")
    return found[-1]


def profile(preset: str, batch: int, seq: int, rows: str, attention: str, out_dir: str | Path, *,
            steps: int = 2, warmup: int = 2, dtype: str = "auto", remat: str = "none") -> Path:
    """Trace ``steps`` steps after ``warmup`` untimed ones; returns the perfetto trace's path."""
    import jax

    from sft_jax import bench
    from sft_jax.models.family import config_for_preset, family_of

    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    cfg = config_for_preset(preset, remat=remat, dtype=dtype, attention=attention)
    params = family_of(cfg).init_params(cfg, jax.random.key(0))["params"]
    hf_batch, jax_rows = bench._problem(cfg, rows, batch, seq, 0)
    host_batch = jax_rows if jax_rows is not None else bench.jax_batch(hf_batch)
    one_step, _, _ = bench.jax_step_fn(cfg, params, host_batch, total_steps=warmup + steps, warmup=warmup)
    for _ in range(warmup):
        one_step()()
    out_dir = Path(out_dir)
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        for _ in range(steps):
            wait = one_step()
        wait()
    return find_trace(out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rows", default="packed", choices=["dense", "packed"])
    ap.add_argument("--attention", default="cudnn_bias,auto", help="comma list; one trace per path")
    ap.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=2, help="traced steps")
    ap.add_argument("--out", default="profile_step_out", help="trace directories go under here")
    ap.add_argument("--device", default=None, help="regex for the trace's device process names "
                    f"(default {DEVICE_PROCESSES!r}; on CPU '^/host:CPU')")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--summarise", metavar="TRACE", help="only summarise this perfetto_trace.json.gz")
    ap.add_argument("--json", help="write the summaries here")
    args = ap.parse_args(argv)

    summaries = {}
    if args.summarise:
        summaries[args.summarise] = summarise(load_trace(args.summarise), args.device or DEVICE_PROCESSES, args.top)
        print(summary_markdown(summaries[args.summarise], args.summarise, args.steps))
    else:
        import jax

        device = args.device or (DEVICE_PROCESSES if jax.default_backend() != "cpu" else "^/host:CPU")
        for attention in args.attention.split(","):
            title = f"{args.preset} B={args.batch} {args.rows} attention={attention}"
            try:
                path = profile(args.preset, args.batch, args.seq, args.rows, attention, Path(args.out) / attention,
                               steps=args.steps, dtype=args.dtype, remat=args.remat)
            except Exception as e:  # one failed path (a kernel this device lacks) must not hide the others
                print(f"### {title}\n\nnot measured ({type(e).__name__}: {str(e).splitlines()[0][:300]})\n", flush=True)
                summaries[title] = {"error": f"{type(e).__name__}: {e}"}
                continue
            summaries[title] = summarise(load_trace(path), device, args.top)
            print(summary_markdown(summaries[title], title, args.steps) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
