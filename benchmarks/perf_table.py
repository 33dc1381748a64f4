"""The docs/benchmarks.md speed table from ``python -m sft_jax.bench --json`` files.

    python benchmarks/perf_table.py results/*.json > table.md

Every cell of the planned grid (benchmarks/perf_check.sh) that no file measured says
"not measured", with the recorded error where a run failed.
"""

from __future__ import annotations

import json
import sys

NM = "not measured"
SYSTEMS = ("jax/xla", "jax/cudnn_bias", "jax/auto", "torch", "torch.compile")
GRID = [("gpt2-large", rows, b) for b in (8, 16) for rows in ("dense", "packed")] + [
    ("gpt2", "dense", 16), ("gpt2", "packed", 16), ("gpt2-xl", "dense", 8), ("gpt2-xl", "packed", 8)]


def load(paths) -> tuple[list[dict], dict]:
    records, versions = [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        records += data["records"]
        versions = data.get("versions", versions)
    return records, versions


def table(records: list[dict], versions: dict) -> str:
    by_key = {(r["preset"], r["rows"], r["batch"], r["system"]): r for r in records}
    head = "| preset | rows | B | " + " | ".join(SYSTEMS) + " | best JAX MFU | best JAX / torch.compile |"
    lines = [head, "|" + " --- |" * 3 + " ---: |" * (len(SYSTEMS) + 2)]
    extra = sorted({(r["preset"], r["rows"], r["batch"]) for r in records} - set(GRID))
    for preset, rows, batch in GRID + extra:
        cells, jax_best = [], None
        for system in SYSTEMS:
            r = by_key.get((preset, rows, batch, system))
            if r is None:
                cells.append(NM)
            elif "error" in r:
                cells.append(f"{NM} ({r['error'].split(':')[0]})")
            else:
                cells.append(f"{r['tokens_per_s'] / 1e3:.1f}k")
                if system.startswith("jax/") and (jax_best is None or r["tokens_per_s"] > jax_best["tokens_per_s"]):
                    jax_best = r
        compiled = by_key.get((preset, rows, batch, "torch.compile"))
        mfu = NM if jax_best is None or jax_best.get("mfu") is None else f"{jax_best['mfu']:.0%}"
        ratio = (f"{jax_best['tokens_per_s'] / compiled['tokens_per_s']:.2f}×"
                 if jax_best and compiled and "error" not in compiled else NM)
        lines.append(f"| {preset} | {rows} | {batch} | " + " | ".join(cells) + f" | {mfu} | {ratio} |")
    lines += ["", "tokens/s over all positions of the rows (supervised tokens/s are in the JSON); "
              "packed-row MFU counts T = 1024 attention FLOPs although the block-diagonal mask skips some; "
              "torch on packed rows uses SDPA with a 4D block-diagonal mask."]
    if versions:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    records, versions = load(paths)
    print(table(records, versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
