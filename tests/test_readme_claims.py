"""Documented figures that no behavioural test pins: defaults and constants stated in docs/.

Each assertion quotes the sentence it holds and names its page; change the code and the page together."""

import os
import threading

from etils import epath

from sft_jax import config as config_lib
from sft_jax.data.cache import cache_root
from sft_jax.data.config import DataConfig
from sft_jax.runtime.distributed import DistributedConfig
from sft_jax.runtime.runlock import Lease


def test_documented_defaults():
    # docs/clusters.md: "If a process dies, the others exit non-zero after distributed.heartbeat_timeout
    # seconds (default 100)"
    assert DistributedConfig().heartbeat_timeout == 100
    # docs/training.md: "A persistent XLA compilation cache is on by default (train.compilation_cache,
    # default ~/.cache/sft_jax/xla"
    assert config_lib.TrainSection().compilation_cache == "~/.cache/sft_jax/xla"


def test_data_cache_default_location(monkeypatch):
    # docs/configuration.md, data.cache_dir: "$SFT_JAX_DATA_CACHE or ~/.cache/sft_jax/data"
    monkeypatch.delenv("SFT_JAX_DATA_CACHE", raising=False)
    assert os.path.expanduser(cache_root(DataConfig())) == os.path.expanduser("~/.cache/sft_jax/data")
    monkeypatch.setenv("SFT_JAX_DATA_CACHE", "/somewhere/else")
    assert cache_root(DataConfig()) == "/somewhere/else"


def test_gs_lease_is_renewed_every_40_s_and_expires_after_120(tmp_path):
    # docs/training.md: "the holder renews it every 40 s, and a newcomer takes it over only once
    # it has expired (120 s after the holder's death)"
    waits = []

    class Recording(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            return True  # stop at once: one renewal period recorded

    lease = Lease(epath.Path(tmp_path), settle_s=0.0, clock=lambda: 1000.0)
    lease._stop = Recording()
    lease.acquire()
    lease._thread.join()
    assert lease.read()["expires"] == 1000.0 + 120
    assert waits == [40.0]
