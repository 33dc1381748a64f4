"""End-of-run report: plots of metrics.jsonl and a ``report.md`` that embeds them, with a
summary table and the data pipeline's own report. Every section copes with missing keys
(no eval, no MFU on CPU, ...): what was not logged is left out, not drawn empty."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Optional

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from sft_jax.core.metrics import MetricsLogger, read_metrics

# (key, label, format) rows of the summary table, in order.
SUMMARY_ROWS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("final_loss", "final train loss", lambda v: f"{v:.4f}"),
    ("eval_loss", "eval loss", lambda v: f"{v:.4f}"),
    ("eval_ppl", "eval perplexity", lambda v: f"{v:.3f}"),
    ("exact_match", "exact match", lambda v: f"{v:.2%}"),
    ("tokens_per_s", "tokens/s (median)", lambda v: f"{v:,.0f}"),
    ("mfu", "MFU (median)", lambda v: f"{v:.1%}"),
    ("steps", "steps", lambda v: f"{v:,}"),
    ("wall_time_s", "wall time", lambda v: _duration(v)),
)


def _duration(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _median(values: list[float]) -> Optional[float]:
    """Median over the logged windows (compilation is in none of them: ``first_step_s``)."""
    return statistics.median(values) if values else None


def summarize(records: list[dict]) -> dict:
    """Summary numbers derivable from the metrics records alone."""
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    out: dict[str, Any] = {}
    _, loss = _series(train, "loss")
    if loss:
        out["final_loss"] = loss[-1]
    for key in ("eval_loss", "eval_ppl", "exact_match"):
        _, values = _series(evals, key)
        if values:
            out[key] = values[-1]
    if "eval_loss" in out and "eval_ppl" not in out:
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 700.0))
    for key in ("tokens_per_s", "mfu"):
        value = _median(_series(train, key)[1])
        if value is not None:
            out[key] = value
    if train:
        out["steps"] = max(r["step"] for r in train)
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    if len(times) > 1:
        out["wall_time_s"] = max(times) - min(times)  # first to last log; callers can pass the true one
    return out


def _plot(path: Path, title: str, left: list[tuple[str, list, list]], ylabel: str,
          right: Optional[tuple[str, list, list]] = None, right_label: str = "", logy: bool = False) -> bool:
    """One figure: line series on the left axis, optionally one on a twin right axis.
    Returns False (and writes nothing) when there is no data at all."""
    left = [s for s in left if s[1]]
    if not left:
        return False
    # fixed margins, not tight_layout: it lays the figure out twice and took half of each plot's time
    twin = right is not None and bool(right[1])
    fig, ax = plt.subplots(figsize=(7, 4))
    fig.subplots_adjust(left=0.13, right=0.87 if twin else 0.97, bottom=0.12, top=0.92)
    for label, xs, ys in left:
        marker = "o" if len(xs) < 30 or label.startswith("eval") else None
        ax.plot(xs, ys, label=label, marker=marker, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy and all(y > 0 for _, _, ys in left for y in ys):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if twin:
        ax2 = ax.twinx()
        ax2.plot(right[1], right[2], color="tab:red", alpha=0.6, label=right[0])
        ax2.set_ylabel(right_label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best")
    ax.set_title(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(records: list[dict], plot_dir: Path) -> list[tuple[str, Path]]:
    """PNG plots of the logged curves; returns (title, path) of those that had data."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    figures = [
        ("Loss", "loss.png", dict(left=[("train loss", *_series(train, "loss")),
                                        ("eval loss", *_series(evals, "eval_loss"))], ylabel="loss")),
        ("Learning rate", "lr.png", dict(left=[("lr", *_series(train, "lr"))], ylabel="learning rate")),
        ("Gradient norm", "grad_norm.png", dict(left=[("grad norm (before clipping)", *_series(train, "grad_norm"))],
                                                ylabel="global grad norm", logy=True,
                                                right=("clip ratio", *_series(train, "clip_ratio")),
                                                right_label="clip ratio (kept fraction)")),
        ("Throughput", "throughput.png", dict(left=[("tokens/s", *_series(train, "tokens_per_s"))], ylabel="tokens/s",
                                              right=("MFU", *_series(train, "mfu")), right_label="MFU")),
        ("Held-out exact match", "exact_match.png", dict(left=[("greedy exact match", *_series(evals, "exact_match"))],
                                                         ylabel="exact match")),
        *rl_figures(train, evals, [r for r in records if r.get("split") == "rollout"]),
    ]
    written = []
    for title, name, kwargs in figures:
        if _plot(plot_dir / name, title, **kwargs):
            written.append((title, plot_dir / name))
    return written


def rl_figures(train: list[dict], evals: list[dict], rollouts: list[dict]) -> list[tuple[str, str, dict]]:
    """PPO/GRPO's curves (``python -m sft_jax.ppo``): each rollout's statistics and the
    updates' losses; none for runs without rollouts."""
    if not rollouts:
        return []
    with_critic = any("explained_variance" in r for r in rollouts)  # PPO; GRPO has no critic
    figures = [
        ("RL: reward", "rl_reward.png", dict(
            left=[("rollout reward (mean)", *_series(rollouts, "reward_mean")),
                  ("held-out sampled reward", *_series(evals, "eval_sampled_reward"))], ylabel="reward",
            right=("rollout reward (std)", *_series(rollouts, "reward_std")), right_label="std")),
        ("RL: KL to the reference", "rl_kl.png", dict(
            left=[("rollout KL per response", *_series(rollouts, "kl_per_response")),
                  ("held-out KL per response (T=1)", *_series(evals, "eval_kl_per_response"))], ylabel="nat",
            right=("beta", *_series(rollouts, "beta")), right_label="beta")),
        ("RL: policy updates", "rl_policy.png", dict(
            left=[("clip fraction", *_series(train, "clipfrac")), ("|ratio - 1|", *_series(train, "ratio_dev"))],
            ylabel="fraction", right=("entropy", *_series(train, "entropy")), right_label="entropy (nat/token)")),
        ("RL: critic", "rl_critic.png", dict(
            left=[("value loss", *_series(train, "value_loss"))], ylabel="value loss",
            right=("explained variance", *_series(rollouts, "explained_variance")), right_label="explained variance")),
        ("RL: responses", "rl_responses.png", dict(
            left=[("response length (tokens)", *_series(rollouts, "response_length"))], ylabel="tokens",
            right=("no-EOS penalty rate", *_series(rollouts, "eos_penalty_rate")), right_label="rate")),
        ("RL: time per iteration", "rl_time.png", dict(
            left=[("rollout (sample + score)", *_series(rollouts, "rollout_time_s")),
                  ("one update", *_series(train, "step_time_s"))], ylabel="seconds")),
    ]
    return [f for f in figures if with_critic or f[1] != "rl_critic.png"]


def _summary_table(summary: dict) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    known = set()
    for key, label, fmt in SUMMARY_ROWS:
        known.add(key)
        value = summary.get(key)
        lines.append(f"| {label} | {fmt(value) if isinstance(value, (int, float)) else '—'} |")
    for key, value in summary.items():  # whatever else the caller passed, as given
        if key not in known:
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)


ANALYSIS_LINK = "## Analysis\n\nThe claims of instruction tuning measured on this run: [analysis.md](analysis.md)."


def link_analysis(output_dir: str | os.PathLike) -> None:
    """Add the analysis link to an existing report.md (``python -m sft_jax.analyze`` runs after training)."""
    report = Path(output_dir) / "report.md"
    if report.is_file() and ANALYSIS_LINK not in (text := report.read_text(encoding="utf-8")):
        report.write_text(text.rstrip("\n") + "\n\n" + ANALYSIS_LINK + "\n", encoding="utf-8")


def write_report(output_dir: str | os.PathLike, *, data_report_md: Optional[str], summary: dict) -> Path:
    """Write ``output_dir/plots/*.png`` and ``output_dir/report.md``; return the report's path.

    ``summary`` values (e.g. the true wall time, final eval numbers) override what is
    derived from ``metrics.jsonl``; keys outside the standard table are listed after it.
    """
    output_dir = Path(output_dir)
    records = read_metrics(output_dir / MetricsLogger.FILENAME)
    table = {**summarize(records), **{k: v for k, v in summary.items() if v is not None}}
    plots = write_plots(records, output_dir / "plots")

    parts = ["# Training report", "", "## Summary", "", _summary_table(table), ""]
    if plots:
        parts += ["## Curves", ""]
        for title, path in plots:
            parts += [f"### {title}", "", f"![{title}]({path.relative_to(output_dir).as_posix()})", ""]
    else:
        parts += ["_No metrics were logged, so there are no curves._", ""]
    samples = [r for r in records if r.get("split") == "text"]
    if samples:
        last_step = samples[-1]["step"]
        parts += [f"## Samples (step {last_step})", ""]
        for r in (r for r in samples if r["step"] == last_step):
            parts += [f"**{r.get('tag', '')}**", "", "```", str(r.get("text", "")), "```", ""]
    if data_report_md:
        parts += ["## Data", "", data_report_md.strip(), ""]
    if (output_dir / "analysis.md").is_file():
        parts += [ANALYSIS_LINK, ""]
    report = output_dir / "report.md"
    report.write_text("\n".join(parts), encoding="utf-8")
    return report
