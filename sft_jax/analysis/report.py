"""analysis.md (verdict table, then one section per claim, plots embedded) and analysis.json."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:12]) + (", ..." if len(v) > 12 else "") + "]"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1e5:
        return f"{v:,}"
    return str(v)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            out.append((key, f"{len(v)} rows (analysis.json)") if len(v) > 8 else None)
            if len(v) <= 8:
                for i, row in enumerate(v):
                    out.append((f"{key}[{i}]", ", ".join(f"{a}={_fmt(b)}" for a, b in row.items())))
        else:
            out.append((key, _fmt(v)))
    return [x for x in out if x is not None]


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "item"):
        return _json_safe(x.item())
    return x


def verdict_table(sections: list[dict]) -> str:
    lines = ["| claim | study | verdict |", "|---|---|---|"]
    for s in sections:
        lines.append(f"| {s['claim'].split('.', 1)[0]} | {s['title']} | **{s['verdict']}** |")
    return "\n".join(lines)


def write(directory, sections: list[dict], header: dict) -> tuple[Path, Path]:
    directory = Path(directory)
    payload = {**header, "sections": sections}
    json_path = directory / "analysis.json"
    json_path.write_text(json.dumps(_json_safe(payload), indent=1))
    parts = ["# Analysis of this run", "",
             "What the claims of instruction tuning say, measured on this run. Verdicts: holds / does not hold / "
             "inconclusive; every threshold is a named constant, printed in its section. Numbers in full: "
             "analysis.json.", "", verdict_table(sections), ""]
    for s in sections:
        parts += [f"## {s['title']}: {s['verdict']}", "", f"**Claim.** {s['claim']}", "",
                  f"**Method.** {s['method']}", "",
                  "**Thresholds.** " + ", ".join(f"`{k} = {v}`" for k, v in s["thresholds"].items()), ""]
        if s["numbers"]:
            parts += ["| quantity | value |", "|---|---|"]
            parts += [f"| {k} | {v} |" for k, v in _flatten(s["numbers"]) if k != "claim_arithmetic"]
            parts.append("")
        parts += [f"**Verdict: {s['verdict']}.**", ""]
        parts += [f"{n}" for n in s["notes"]] + [""]
        for p in s["plots"]:
            rel = Path(p).relative_to(directory).as_posix() if Path(p).is_relative_to(directory) else p
            parts += [f"![{s['title']}]({rel})", ""]
    md_path = directory / "analysis.md"
    md_path.write_text("\n".join(parts), encoding="utf-8")
    return md_path, json_path
