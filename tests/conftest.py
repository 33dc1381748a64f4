"""Test-wide setup: 8 fake CPU devices, offline hub, before anything imports jax."""

import os

# XLA:CPU's LLVM backend at -O0 for the tests: most of a test's time is compiling tiny programs
# (a tiny-config run: 31 -> 19 CPU seconds), and the programs run a few steps. Runs inherit the
# flag through the environment; the demo test drops it (as shipped, and 400 steps long), and so
# can anyone with SFT_JAX_TEST_XLA_OPT=1. Every comparison in the suite is between programs
# compiled the same way, or against torch with a tolerance.
TEST_XLA_FLAGS = "" if os.environ.get("SFT_JAX_TEST_XLA_OPT") == "1" else "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", TEST_XLA_FLAGS]).strip()
# CPU unless asked otherwise: tests/test_gpu.py runs on a GPU with SFT_JAX_TEST_PLATFORMS=cuda
# (benchmarks/gpu_check.sh); the rest of the suite assumes the 8 CPU devices.
os.environ["JAX_PLATFORMS"] = os.environ.get("SFT_JAX_TEST_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenized data cache (data.cache=auto) goes to a per-session folder, never to ~/.cache.
if "SFT_JAX_DATA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["SFT_JAX_DATA_CACHE"] = tempfile.mkdtemp(prefix="sft_jax_data_cache_")
    atexit.register(shutil.rmtree, os.environ["SFT_JAX_DATA_CACHE"], True)

# Property tests: the same examples on every run (derandomized, no example database), so a
# red CI is reproducible and a green one is not luck. HYPOTHESIS_PROFILE=explore searches anew.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sft_demo(tmp_path_factory):
    """``python -m sft_jax.train`` as shipped (the SFT demo, 400 steps, one plain CPU device), run
    once per session: tests/test_train_demo.py checks it; the preference and RL demo tests start
    from its model (``.out / "hf"``)."""
    from train_fixtures import run_shipped_demo

    return run_shipped_demo(tmp_path_factory.mktemp("sft_demo") / "demo")


@pytest.fixture(scope="session")
def rl_sft_start(sft_demo, tmp_path_factory):
    """The RL demo's SFT start, shortened: instead of 400 steps from scratch (configs/rl_sft_demo.yaml),
    the SFT demo model (``sft_demo``) fine-tuned on the same demonstrations with the sign-off habit
    (demo:noisy), long enough for it to sign off on most "reverse" and "sort" prompts under greedy
    decoding, as the full start does. The RL demo tests start from its export (``.out / "hf"``)."""
    from train_fixtures import run_rl_sft_start

    assert sft_demo.done.returncode == 0, sft_demo.done.stderr[-3000:]
    return run_rl_sft_start(sft_demo.out / "hf", tmp_path_factory.mktemp("rl_sft_start") / "rl_sft_demo")
