"""Readers of a finished run: the claims of instruction tuning, measured on the user's own run.

    python -m sft_jax.analyze RUN_DIR [--studies tokens,variance,stability,compute,memory]
    python -m sft_jax.plan --preset gpt2-xl --devices 8 --memory 16GB

Modules: run (load a run's config, data, checkpoints and metrics), tokens (claim 1: prompt vs
response tokens and gradients), variance (claim 2: gradient variance against length, noise
scale), stability (claim 4: clipping, spikes, the lr curve), compute (claim 3: step time
against length), memory (claim 6: bytes per device, the planner), studies (the sections in
order), report (analysis.md and analysis.json).
"""
