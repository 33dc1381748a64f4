"""Cache format choice: random document reads and writes, flat numpy memmap vs HF datasets (Arrow).

    python benchmarks/cache_format.py   # 200,000 documents of 20..300 uint16 tokens; figures in docs/benchmarks.md
"""
import resource
import tempfile
import time

import numpy as np
n = 200_000
rng = np.random.default_rng(0)
lengths = rng.integers(20, 300, n)
offsets = np.zeros(n + 1, np.int64); np.cumsum(lengths, out=offsets[1:])
tokens = rng.integers(0, 8192, offsets[-1]).astype(np.uint16)
d = tempfile.mkdtemp()
t = time.perf_counter(); np.save(f"{d}/tok.npy", tokens); np.save(f"{d}/off.npy", offsets); print("np write", time.perf_counter() - t)
tm = np.load(f"{d}/tok.npy", mmap_mode="r"); om = np.load(f"{d}/off.npy", mmap_mode="r")
idx = rng.integers(0, n, 64 * 200)
t = time.perf_counter()
for i in idx: x = np.asarray(tm[om[i]:om[i + 1]])
print("np read 12800 docs", time.perf_counter() - t)
import datasets
t = time.perf_counter()
ds = datasets.Dataset.from_dict({"tokens": [tokens[offsets[i]:offsets[i+1]] for i in range(n)]}, features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("uint16"))}))
ds.save_to_disk(f"{d}/arrow"); print("arrow write", time.perf_counter() - t)
ds = datasets.load_from_disk(f"{d}/arrow").with_format("numpy")
t = time.perf_counter()
for i in idx: x = ds[int(i)]["tokens"]
print("arrow read 12800 docs one by one", time.perf_counter() - t)
t = time.perf_counter()
for b in range(200): x = ds[idx[b*64:(b+1)*64]]["tokens"]
print("arrow read 200 batches of 64", time.perf_counter() - t)
print("maxrss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
