"""``python -m sft_jax.analyze RUN_DIR [--studies tokens,variance,...]``: the claims of
instruction tuning measured on a run; writes RUN_DIR/analysis.md (+ plots) and analysis.json.

Default studies (train nothing): tokens, variance, stability, compute, memory. Opt-in
studies that train short schedules under RUN_DIR/analysis_runs/: masking, data-size."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sft_jax.config import ConfigError


def parse_args(argv=None):
    from sft_jax.analysis.stability import SPIKE_K
    from sft_jax.analysis.studies import DEFAULT_STUDIES

    p = argparse.ArgumentParser(prog="python -m sft_jax.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a training run's output_dir (holds config.yaml, metrics.jsonl, checkpoints/)")
    p.add_argument("--studies", default=",".join(DEFAULT_STUDIES), help=f"comma list (default: {','.join(DEFAULT_STUDIES)})")
    p.add_argument("--spike-k", type=float, default=SPIKE_K, help="grad-norm spike: > k x the trailing median")
    p.add_argument("--compute-max-len", type=int, default=None,
                   help="longest T timed by the compute study (default max(n_positions, 1024))")
    p.add_argument("--study-steps", type=int, default=0,
                   help="optimizer steps per run of the opt-in studies (default: min(200, the run's steps))")
    p.add_argument("--data-sizes", default="8,4,2,1",
                   help="data-size study: one run on n/k of the n kept training documents per k (default 8,4,2,1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of documents and the bootstrap")
    return p.parse_args(argv)


def analyze(run_dir, studies, *, spike_k: float, seed: int = 0, compute_max_len=None, study_steps: int = 0,
            data_sizes: tuple[int, ...] = (8, 4, 2, 1)) -> tuple[Path, list[dict]]:
    from sft_jax.core import report as train_report
    from sft_jax.analysis import report, studies as st
    from sft_jax.analysis.run import AnalysisError, load_run
    from sft_jax.core.setup import enable_compilation_cache

    unknown = [s for s in studies if s not in st.STUDIES]
    if unknown:
        raise AnalysisError(f"--studies: unknown study {unknown[0]!r}; choose from {','.join(st.STUDIES)}")
    t0 = time.perf_counter()
    run = load_run(run_dir)
    # the run's persistent XLA cache, as the trainer uses it: a repeated analysis, and the opt-in
    # studies' short runs (the trainer's own programs when they run the run's steps), skip compiles
    enable_compilation_cache(run.config.train.compilation_cache)
    opts = st.Options(spike_k=spike_k, plot_dir=run.directory / "analysis_plots", seed=seed,
                      compute_max_len=compute_max_len, study_steps=study_steps, data_sizes=tuple(data_sizes))
    sections, seconds = [], {}
    for name in studies:
        t = time.perf_counter()
        sections.append(st.STUDIES[name](run, opts))
        seconds[name] = time.perf_counter() - t
        print(f"sft_jax.analyze: {name}: {sections[-1]['verdict']} ({seconds[name]:.0f}s)", file=sys.stderr, flush=True)
    md, _ = report.write(run.directory, sections, {"run_dir": str(run.directory), "studies": list(studies),
                                                   "seconds": seconds, "wall_s": time.perf_counter() - t0})
    train_report.link_analysis(run.directory)
    return md, sections


def main(argv=None) -> int:
    args = parse_args(argv)
    from sft_jax.analysis.report import verdict_table
    from sft_jax.analysis.run import AnalysisError

    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if args.study_steps < 0:
        print(f"sft_jax.analyze: --study-steps={args.study_steps}: expected >= 0", file=sys.stderr)
        return 2
    try:
        data_sizes = tuple(int(k) for k in args.data_sizes.split(","))
        if not data_sizes or min(data_sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"sft_jax.analyze: --data-sizes={args.data_sizes!r}: expected divisors >= 1 such as 8,4,2,1",
              file=sys.stderr)
        return 2
    try:
        md, sections = analyze(args.run_dir, studies, spike_k=args.spike_k, seed=args.seed,
                               compute_max_len=args.compute_max_len, study_steps=args.study_steps,
                               data_sizes=data_sizes)
    except (AnalysisError, ConfigError) as e:
        print(f"sft_jax.analyze: {e}", file=sys.stderr)
        return 2
    print(verdict_table(sections))
    print(f"analysis: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
