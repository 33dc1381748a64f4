"""The analysis, one study per claim. Each returns a section: the claim, how it was measured,
its threshold constants, the numbers, a verdict (holds / does not hold / inconclusive) and
plots. Default studies read the run's data, checkpoints and metrics and train nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from sft_jax.core import mesh as shd
from sft_jax.analysis import compute, memory, stability, tokens, variance
from sft_jax.analysis.run import Run, one_doc_rows, row_width

DEFAULT_STUDIES = ("tokens", "variance", "stability", "compute", "memory")
OPT_IN_STUDIES = ("masking", "data-size")  # they train short schedules under RUN_DIR/analysis_runs/
GRAD_DOCS = 64  # documents whose gradients the token study splits
GRAD_BATCH = variance.CHUNK  # documents per gradient batch: the variance study's compiled shape
MIN_STATE_SHARE = 0.5  # claim 6 holds if parameters + gradients + Adam are at least this share of XLA's bytes


@dataclasses.dataclass
class Options:
    spike_k: float = stability.SPIKE_K
    plot_dir: Path | None = None
    seed: int = 0
    compute_max_len: int | None = None  # longest T the compute study times (default max(n_positions, 1024))
    study_steps: int = 0  # optimizer steps per opt-in study run (0: min(STUDY_STEPS, the run's steps))
    data_sizes: tuple[int, ...] = (8, 4, 2, 1)  # the data-size study trains on n/k documents for each k


def section(key, title, claim, method, thresholds, numbers, verdict, notes=(), plots=()) -> dict:
    return {"key": key, "title": title, "claim": claim, "method": method, "thresholds": thresholds,
            "numbers": numbers, "verdict": verdict, "notes": list(notes), "plots": [str(p) for p in plots]}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, opts: Options, name: str):
    if opts.plot_dir is None:
        return []
    opts.plot_dir.mkdir(parents=True, exist_ok=True)
    path = opts.plot_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return [path]


# --- 1. token accounting ----------------------------------------------------------------

def token_study(run: Run, opts: Options) -> dict:
    stats = tokens.length_stats(run.train_ds)
    ratio = stats["L_A"]["mean"] / max(stats["L_Q"]["mean"], 1e-9)
    rng = np.random.default_rng(opts.seed)
    docs = np.sort(rng.choice(len(run.train_ds), min(GRAD_DOCS, len(run.train_ds)), replace=False))
    width = row_width(run.train_ds, docs)
    batches = []
    for lo in range(0, len(docs), GRAD_BATCH):
        batch = one_doc_rows(run.train_ds, docs[lo:lo + GRAD_BATCH], width)
        batches.append((batch, tokens.full_weights(batch)))
    numbers = {"L_Q": stats["L_Q"], "L_A": stats["L_A"], "L_A/L_Q": ratio,
               "supervised_share": stats["supervised_share"], "documents": stats["documents"],
               "gradient_documents": len(docs)}
    numbers["gradients_at_init"] = tokens.gradient_split(run.model_cfg, run.initial_params(), batches)
    step, params = run.latest_checkpoint()
    notes = []
    if params is not None:
        numbers[f"gradients_at_step_{step}"] = tokens.gradient_split(run.model_cfg, params, batches)
    else:
        notes.append("no checkpoint: gradients at the initial model only")
    return section(
        "tokens", "Token accounting", "1. Response tokens dominate the update: L_A is much larger than L_Q, "
        "so the response-only gradient drives training and the instruction only conditions it.",
        "L_Q = tokens outside responses (instruction, template), L_A = response tokens, per training document. "
        f"On {len(docs)} documents, the unmasked loss's gradient split into grad(L_Q) (prompt-token NLL) and "
        "grad(L_A) (response-token NLL): norms, cosine, and each part's share <g_part, g>/|g|^2 (they sum to 1).",
        {"MIN_LENGTH_RATIO": tokens.MIN_LENGTH_RATIO}, numbers, tokens.verdict(stats),
        [f"holds if L_A/L_Q >= {tokens.MIN_LENGTH_RATIO}; measured {ratio:.3f}"] + notes)


# --- 2. gradient variance against length ------------------------------------------------

def _supervised_counts(ds) -> np.ndarray:
    """Supervised targets per document: supervised tokens after the first (the trainer's weights)."""
    starts = ds.offsets[:-1]
    return np.add.reduceat(ds.supervised.astype(np.int64), starts) - ds.supervised[starts]


def variance_study(run: Run, opts: Options) -> dict:
    step, params = run.latest_checkpoint()
    where = f"newest checkpoint (step {step})"
    if params is None:
        params, where = run.initial_params(), "initial model (no checkpoint)"
    counts = _supervised_counts(run.train_ds)
    bins = variance.length_bins(counts, seed=opts.seed)
    width = row_width(run.train_ds, np.concatenate(bins))
    pooled_sum, pooled_sq, pooled_T, per_bin = None, [], [], []
    for idx in bins:
        batch = one_doc_rows(run.train_ds, idx, width)
        T = batch["weights"].sum(axis=1)
        total, sq, dev = variance.per_example_stats(run.model_cfg, params, batch)
        pooled_sum = total if pooled_sum is None else jax.tree.map(np.add, pooled_sum, total)
        pooled_sq.append(sq)
        pooled_T.append(T)
        per_bin.append((T, dev))
    usable = [b for b in per_bin if len(b[1]) >= variance.MIN_PER_BIN and np.all(b[0] > 0)]
    numbers = {"model": where, "bins_tried": len(per_bin), "bins_usable": len(usable),
               "bin_sizes": [len(b[1]) for b in per_bin], "bin_mean_T": [float(np.mean(b[0])) for b in per_bin]}
    notes = []
    fit = None
    if len(usable) >= variance.MIN_BINS:
        fit = variance.fit_exponent(usable, seed=opts.seed)
        numbers["summed_loss"] = fit
        numbers["per_token_loss"] = variance.fit_exponent(usable, per_token=True, seed=opts.seed)
    else:
        notes.append(f"only {len(usable)} length bins of >= {variance.MIN_PER_BIN} examples; "
                     f"need {variance.MIN_BINS}")
    sq = np.concatenate(pooled_sq)
    n = len(sq)
    mean_sq = float(sum(np.sum((np.asarray(x) / n) ** 2) for x in jax.tree.leaves(pooled_sum)))
    noise = variance.noise_scale(sq, mean_sq)
    mean_T = float(np.mean(np.concatenate(pooled_T)))
    train = run.train_records()
    step_tokens = float(np.mean([r["supervised_tokens"] for r in train])) if train else float("nan")
    noise.update({"B_simple_tokens": noise["B_simple"] * mean_T, "mean_response_tokens": mean_T,
                  "run_global_batch_size": run.config.train.global_batch_size,
                  "run_supervised_tokens_per_step": step_tokens})
    numbers["noise_scale"] = noise
    plots = []
    if fit is not None:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        t, v = np.array(fit["T"]), np.array(fit["var"])
        ax.loglog(t, v, "o", label="Var per bin")
        c = np.mean(np.log(v)) - fit["exponent"] * np.mean(np.log(t))
        ax.loglog(t, np.exp(c) * t ** fit["exponent"], "-", label=f"fit: T^{fit['exponent']:.2f}")
        ax.set_xlabel("response tokens T")
        ax.set_ylabel("mean |g_i - ḡ|^2")
        ax.legend()
        plots = _save(fig, opts, "variance_vs_length.png")
    return section(
        "variance", "Gradient variance against length",
        "2. Gradient variance grows with sequence length (Var ∝ T); long answers make training less stable.",
        f"At the {where}: per-example gradients g_i of the summed response NLL, in up to {variance.N_BINS} "
        f"response-length bins of up to {variance.PER_BIN} training documents. Var = mean |g_i - ḡ|^2 per bin; "
        f"OLS of log Var on log T with a {variance.BOOTSTRAP}-resample bootstrap 95% interval (examples "
        "resampled within bins). Per token: Var / T. B_simple = tr(Σ)/|G|^2 from batch sizes 1 and n "
        "(McCandlish et al. 2018), in sequences and x mean response tokens in tokens.",
        {"CLAIM_EXPONENT": variance.CLAIM_EXPONENT, "MIN_BINS": variance.MIN_BINS,
         "MIN_PER_BIN": variance.MIN_PER_BIN, "MAX_INTERVAL_WIDTH": variance.MAX_INTERVAL_WIDTH},
        numbers, variance.verdict(fit),
        notes + [f"holds if the summed-loss exponent's 95% interval contains {variance.CLAIM_EXPONENT} and is "
                 f"narrower than {variance.MAX_INTERVAL_WIDTH}"], plots)


# --- 3. stability ----------------------------------------------------------------------

def stability_study(run: Run, opts: Options) -> dict:
    o = run.config.optim
    train = run.train_records()
    total = run.config.train.steps or (max(r["step"] for r in train) if train else 0)
    arrays = stability.per_step(train)
    thresholds = {"SPIKE_K": opts.spike_k, "WINDOW": stability.WINDOW, "LOSS_MADS": stability.LOSS_MADS,
                  "FOLLOW": stability.FOLLOW, "LR_TOLERANCE": stability.LR_TOLERANCE}
    claim = "4. Linear warmup then cosine decay, and Adam, keep training stable."
    method = (f"Per-step loss, grad norm and clipping from metrics.jsonl. Clipped share during warmup "
              f"({o.warmup_steps} steps) and after; grad-norm spikes (> k x median of the previous "
              f"{stability.WINDOW} steps) and whether the loss rises above its {stability.WINDOW}-step median by "
              f"more than {stability.LOSS_MADS} MADs within {stability.FOLLOW} steps; logged lr against the "
              "linear-warmup + cosine formula.")
    if arrays is None:
        return section("stability", "Stability", claim, method, thresholds, {}, "inconclusive",
                       ["metrics.jsonl has no per-step arrays (step_loss, step_grad_norm, step_clipped): "
                        "the run predates them"])
    warm = arrays["step"] <= o.warmup_steps
    found = stability.spikes(arrays["loss"], arrays["grad_norm"], opts.spike_k)
    lr = stability.lr_deviation(train, o, total)
    nonfinite = int(train[-1].get("nonfinite_total") or 0)
    share = lambda m: float(arrays["clipped"][m].mean()) if m.any() else None
    numbers = {"steps": int(len(arrays["step"])), "clipped_share_warmup": share(warm),
               "clipped_share_after": share(~warm), "grad_norm_spikes": len(found),
               "spikes_followed_by_loss_spike": sum(s["loss_spike_follows"] for s in found),
               "spikes": [dict(s, step=int(arrays["step"][s["index"]])) for s in found][:20],
               "nonfinite_steps": nonfinite, "lr": lr}
    bad = numbers["spikes_followed_by_loss_spike"] > 0 or nonfinite > 0 or lr["relative_to_peak"] > stability.LR_TOLERANCE
    plt = _plt()
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    a.plot(arrays["step"], arrays["loss"], lw=0.8)
    a.set_ylabel("loss")
    b.semilogy(arrays["step"], arrays["grad_norm"], lw=0.8)
    clipped = arrays["clipped"]
    b.plot(arrays["step"][clipped], arrays["grad_norm"][clipped], ".", ms=2, label="clipped")
    for s in found:
        b.axvline(arrays["step"][s["index"]], color="r", lw=0.5)
    b.set_ylabel("grad norm")
    b.set_xlabel("step")
    b.legend()
    plots = _save(fig, opts, "stability.png")
    return section("stability", "Stability", claim, method, thresholds, numbers,
                   "does not hold" if bad else "holds",
                   ["holds if no grad-norm spike is followed by a loss spike, no step was non-finite and the lr "
                    "follows the formula"], plots)


# --- 4. compute against length ------------------------------------------------------------

def compute_study(run: Run, opts: Options) -> dict:
    B = run.config.micro_batch_size()
    ts = compute.lengths(run.model_cfg.max_position_embeddings, opts.compute_max_len)
    cfg = run.model_cfg.replace(dtype=run.config.model.dtype)
    timings = compute.time_steps(cfg, B, ts, seed=opts.seed)
    rows = compute.ratios(cfg, B, timings)
    fit = compute.fit_cost_curve(ts, [np.median(timings[t]) for t in ts])
    numbers = {"batch_rows": B, "median_s": {t: float(np.median(v)) for t, v in timings.items()},
               "spread": {t: compute.spread(v) for t, v in timings.items()}, "doublings": rows,
               "fit_seconds": fit, "device": jax.devices()[0].device_kind}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    med = [np.median(timings[t]) for t in ts]
    ax.loglog(ts, med, "o-", label="measured")
    f = [compute.flops(cfg, B, t)["total"] for t in ts]
    ax.loglog(ts, np.array(f) / f[-1] * med[-1], "--", label="FLOP model (scaled)")
    ax.set_xlabel("T")
    ax.set_ylabel("seconds / step")
    ax.legend()
    plots = _save(fig, opts, "compute_vs_length.png")
    return section(
        "compute", "Compute against length", "3. Attention costs O(L T^2 D): going from T = 512 to 1024 costs "
        "about 4x in attention.",
        f"The run's architecture with random weights, B = {B} rows, forward + backward at T = {ts}; median of "
        f"{compute.REPEATS} timed steps after {compute.WARMUP} warm-ups. Measured t(2T)/t(T) beside the FLOP "
        "model's ratio (6N + 12 L D T per token), its attention-only ratio (4x by construction) and attention's "
        "share of the FLOPs.",
        {"CLAIM_RATIO": compute.CLAIM_RATIO, "RATIO_TOLERANCE": compute.RATIO_TOLERANCE,
         "MAX_SPREAD": compute.MAX_SPREAD}, numbers, compute.verdict(rows),
        [f"the whole step bears the claim out if t(1024)/t(512) is within {compute.CLAIM_RATIO} ± "
         f"{compute.RATIO_TOLERANCE}; inconclusive if the repeats spread by more than {compute.MAX_SPREAD:.0%}"],
        plots)


# --- 5. memory -------------------------------------------------------------------------------

def memory_study(run: Run, opts: Options) -> dict:
    c = run.config
    cfg = run.model_cfg.replace(dtype=c.model.dtype)
    sizes = c.mesh.sizes(jax.device_count())
    remat = c.model.remat if c.model.remat != "offload" or jax.default_backend() != "cpu" else "full"
    layout = memory.Layout(*sizes, remat=remat, global_batch=c.train.global_batch_size,
                           micro_batch=c.micro_batch_size(), seq=c.data.max_length, loss_chunk=c.train.loss_chunk)
    mesh = shd.make_mesh(c.mesh)
    predicted = memory.predict(cfg, layout, memory.state_bytes(cfg, mesh))
    xla = memory.compiled_memory(cfg, layout, mesh)
    xla_total = xla["argument_size_in_bytes"] + xla["temp_size_in_bytes"]
    state = predicted["params"] + predicted["grads"] + predicted["adam"]
    peaks = [r.get("peak_bytes_in_use") for r in run.train_records() if r.get("peak_bytes_in_use")]
    numbers = {"layout": dataclasses.asdict(layout), "predicted_bytes": predicted, "xla_bytes": xla,
               "arguments_predicted_over_xla": predicted["arguments"] / xla["argument_size_in_bytes"],
               "temp_predicted_over_xla": predicted["temp"] / max(xla["temp_size_in_bytes"], 1),
               "state_share_of_xla": state / xla_total,
               "measured_peak_bytes": max(peaks) if peaks else "not measured (CPU keeps no allocator stats)",
               "claim_arithmetic": memory.claim_table()}
    return section(
        "memory", "Memory", "6. Memory ≈ parameters + gradients + optimizer states: for 1.5B parameters about 6 GB "
        "of weights and 12 GB of Adam states, over 20 GB in all.",
        "Bytes per device: the train state counted from its abstract shards; gradients (accumulated + one "
        "micro-step, float32), activations under the remat policy and the float32 logits buffer by the model in "
        "sft_jax/analysis/memory.py; beside XLA's memory_analysis() of the compiled train step (abstract "
        f"shapes; backend {jax.default_backend()}) and, on GPU/TPU, the run's logged peak.",
        {"MIN_STATE_SHARE": MIN_STATE_SHARE}, numbers,
        "holds" if numbers["state_share_of_xla"] >= MIN_STATE_SHARE else "does not hold",
        [f"holds for this run if parameters + gradients + Adam are >= {MIN_STATE_SHARE:.0%} of XLA's "
         f"argument + temp bytes; measured {numbers['state_share_of_xla']:.1%}",
         "claim arithmetic:\n\n" + memory.claim_table_markdown(numbers["claim_arithmetic"])])


STUDIES = {"tokens": token_study, "variance": variance_study, "stability": stability_study,
           "compute": compute_study, "memory": memory_study}


# --- opt-in: masking and data size (they train) ---------------------------------------------

MIN_COPY_INCREASE = 0.02  # claim 5 holds if the full-loss model's prompt-copy rate exceeds the response-only one's by more
MIN_GAP_DROP = 0.0  # data size: the train-eval gap at n must be below the gap at the smallest n (n/8) by more than this (nats)


def _response_only_eval(run):
    """The held-out split under the response-only loss mask (rebuilt if the run trained on prompts)."""
    if not run.config.data.train_on_prompt:
        return run.eval_ds
    from sft_jax.data import build_datasets

    d = dataclasses.replace(run.config.data, train_on_prompt=False)
    return build_datasets(d, run.tokenizer, n_positions=run.model_cfg.max_position_embeddings,
                          vocab_size=run.model_cfg.vocab_size, seed=run.config.train.seed,
                          global_batch_size=run.config.train.global_batch_size)[1]


def _first(ds, n: int) -> np.ndarray:
    return np.arange(min(n, len(ds)))


def masking_study(run: Run, opts: Options) -> dict:
    from sft_jax.analysis import training

    steps = training.study_steps(run, opts.study_steps)
    eval_ds = _response_only_eval(run)
    claim = ("5. Without the instruction mask, the loss also trains the model to reproduce the instruction; "
             "masking removes that term.")
    method = (f"Two runs of {steps} optimizer steps from the run's starting point on its data, written to "
              "RUN_DIR/analysis_runs/{response_only,full_loss}: data.train_on_prompt false vs true, all else equal. "
              f"Compared on the response-only eval loss of the first {training.LOSS_DOCS} held-out documents and on "
              f"the prompt-copy rate of greedy generations for the first {training.COPY_PROMPTS} held-out prompts: "
              f"the pooled share of response n-grams (n = min({training.MAX_NGRAM}, response length)) found in the "
              f"prompt, beside the reference answers' own rate; responses under {training.MIN_RESPONSE} tokens "
              "are excluded and counted.")
    thresholds = {"MIN_COPY_INCREASE": MIN_COPY_INCREASE,
                  "STUDY_STEPS": training.STUDY_STEPS}
    if eval_ds is None or not len(eval_ds):
        return section("masking", "Masking", claim, method, thresholds, {}, "inconclusive",
                       ["the run has no held-out split (data.eval_fraction = 0 and no data.eval)"])
    docs = _first(eval_ds, training.LOSS_DOCS)
    prompts, refs = training.copy_examples(run)
    numbers = {"steps": steps, "eval_documents": len(docs),
               "reference_copy": training.prompt_copy_rate(prompts, refs)}
    for name, on_prompt in (("response_only", False), ("full_loss", True)):
        _, params = training.short_run(run, name, steps, train_on_prompt=on_prompt)
        numbers[name] = {"eval_loss_response": training.mean_nll(run.model_cfg, params, eval_ds, docs),
                         "copy": training.prompt_copy_rate(prompts, training.greedy_responses(run, params, prompts))}
    gain = numbers["full_loss"]["eval_loss_response"] - numbers["response_only"]["eval_loss_response"]
    ref_rate = numbers["reference_copy"]["rate"]
    excess = {k: numbers[k]["copy"]["rate"] - ref_rate for k in ("response_only", "full_loss")}
    numbers.update({"eval_loss_gain": gain, "copy_excess_over_reference": excess})
    increase = numbers["full_loss"]["copy"]["rate"] - numbers["response_only"]["copy"]["rate"]
    numbers["copy_increase_full_over_response_only"] = increase
    verdict = ("inconclusive" if not np.isfinite(increase) else
               "holds" if increase > MIN_COPY_INCREASE else "does not hold")
    return section("masking", "Masking", claim, method, thresholds, numbers, verdict,
                   [f"holds if the full-loss model's prompt-copy rate exceeds the response-only model's by more than "
                    f"{MIN_COPY_INCREASE}; inconclusive if no response is long enough; measured {increase:.4f}. "
                    f"Response-only eval loss, full minus response-only: {gain:.4f} nats (reported, not judged)"])


def data_size_study(run: Run, opts: Options) -> dict:
    from sft_jax.analysis import training

    steps = training.study_steps(run, opts.study_steps)
    n = len(run.train_ds)
    claim = ("7. Generalisation needs many examples (n >> d/eps); small instruction sets lower bias but raise "
             "variance: at a fixed number of steps, fewer examples are fit more closely and generalise worse.")
    fractions = ", ".join("n" if k == 1 else f"n/{k}" for k in sorted(set(opts.data_sizes), reverse=True))
    method = (f"Runs of {steps} optimizer steps each (same start, same schedule) on the first {fractions} "
              f"of the run's {n} kept training documents (data path order), in RUN_DIR/analysis_runs/data_<n>. "
              f"Train loss on the first {training.LOSS_DOCS} documents of each subset, eval loss on the first "
              f"{training.LOSS_DOCS} held-out documents (the run's loss mask), and the gap eval - train.")
    thresholds = {"MIN_GAP_DROP": MIN_GAP_DROP, "STUDY_STEPS": training.STUDY_STEPS}
    if run.eval_ds is None or not len(run.eval_ds):
        return section("data-size", "Data size", claim, method, thresholds, {}, "inconclusive",
                       ["the run has no held-out split (data.eval_fraction = 0 and no data.eval)"])
    eval_docs = _first(run.eval_ds, training.LOSS_DOCS)
    rows = []
    for k in sorted({max(1, n // d) for d in opts.data_sizes}):
        _, params = training.short_run(run, f"data_{k}", steps, subset=np.arange(k))
        tr = training.mean_nll(run.model_cfg, params, run.train_ds, _first(run.train_ds, min(k, training.LOSS_DOCS)))
        ev = training.mean_nll(run.model_cfg, params, run.eval_ds, eval_docs)
        rows.append({"n": k, "train_loss": tr, "eval_loss": ev, "gap": ev - tr})
    drop = rows[0]["gap"] - rows[-1]["gap"]
    numbers = {"steps": steps, "kept_documents": n, "sizes": rows, "gap_drop_smallest_to_all": drop}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ns = [r["n"] for r in rows]
    for key in ("train_loss", "eval_loss", "gap"):
        ax.semilogx(ns, [r[key] for r in rows], "o-", label=key)
    ax.set_xlabel("training documents n")
    ax.set_ylabel("nats per target")
    ax.legend()
    plots = _save(fig, opts, "data_size.png")
    verdict = "inconclusive" if len(rows) < 2 else ("holds" if drop > MIN_GAP_DROP else "does not hold")
    return section("data-size", "Data size", claim, method, thresholds, numbers, verdict,
                   [f"holds if the gap at the smallest n exceeds the gap at all n by more than {MIN_GAP_DROP}; "
                    f"measured {drop:.4f}"], plots)


STUDIES.update({"masking": masking_study, "data-size": data_size_study})
