"""The preference demos: ``python -m sft_jax.dpo`` and ``python -m sft_jax.reward`` with no arguments.

1. The SFT demo model (``runs/demo/hf``), trained first if absent (``python -m sft_jax.train``).
2. Pairs (``runs/demo_pairs/``): 4,000 training prompts and the SFT demo's 500 held-out
   prompts; chosen = the correct answer, rejected = the SFT model's own wrong greedy answer
   where it errs, else the task's fixed corruption (sft_jax.demos.pairs). Made once
   per SFT model (keyed by the hash of its weights).
3. DPO (``configs/dpo_demo.yaml``) or a reward model (``configs/reward_demo.yaml``) on them.
4. Figures: DPO: greedy exact match on SFT's 200 held-out prompts, before (SFT) and after
   (DPO), and preference accuracy (implicit reward beta log pi/pi_ref of chosen > rejected)
   on the 500 held-out pairs, separately for model-made and corrupted rejections. Reward:
   held-out pairwise accuracy of the exported model, the same split.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import jax
import numpy as np

SFT_DIR = Path("runs/demo")
PAIRS_DIR = Path("runs/demo_pairs")
# the RL demo's SFT start (configs/rl_sft_demo.yaml, trained on demo:noisy) and the pairs made from it,
# which configs/rl_reward_demo.yaml trains a reward model on
RL_SFT_DIR = Path("runs/rl_sft_demo")
RL_PAIRS_DIR = Path("runs/rl_demo_pairs")
SIZES = (4000, 500, 200)  # training prompts, held-out pairs, exact-match prompts (tests run smaller ones)
MAX_NEW_TOKENS = 16
# The DPO demo's pass lines. Its figures move with the host's CPU (XLA:CPU emits different code
# for different CPUs, and a few greedy answers and held-out pairs sit near a tie): on the hosts
# measured, DPO's exact match was 0.005 to 0.015 below SFT's and its preference accuracy 0.878
# to 0.904. Each bar sits below that range with a margin, so a working demo passes on any host,
# while a DPO that damages the model or learns no preference (accuracy near 0.5) does not.
EXACT_MATCH_MARGIN = 0.03  # DPO's held-out exact match may be this much below SFT's
ACCURACY_BAR = 0.85  # held-out preference accuracy over all pairs


def ensure_sft_model(sft_dir: Path = SFT_DIR, config_name: str = "demo") -> Path:
    """``sft_dir``'s HF export, trained first with the shipped config ``config_name`` if absent."""
    hf_dir = sft_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        from sft_jax.config import load_config
        from sft_jax.core import loop
        from sft_jax.objectives.sft import SFTObjective

        print(f"sft_jax: no SFT model at {hf_dir}: training it first (python -m sft_jax.train --config "
              f"{config_name})", flush=True)
        loop.run(load_config(config_name, [f"run.output_dir={sft_dir}"]), SFTObjective)
    return hf_dir


def greedy_answers(hf_dir: Path, examples: list[dict]) -> list[str]:
    """The model's greedy answers (EOS stripped) to the demo examples' prompts."""
    from sft_jax.data import DataConfig, decode, encode_prompt
    from sft_jax.models import hf_io as hf
    from sft_jax.inference.sampling import generate
    from sft_jax.models.tokenizer import load_tokenizer

    cfg, params = hf.load_hf(hf_dir, dtype="float32")
    tokenizer = load_tokenizer(str(hf_dir))
    data_cfg = DataConfig.from_dict({"format": "demo"})
    prompts = [encode_prompt(tokenizer, data_cfg, ex) for ex in examples]
    eos, out = tokenizer.eos_token_id, []
    for lo in range(0, len(prompts), 64):
        chunk = prompts[lo:lo + 64]
        chunk = chunk + [chunk[-1]] * (64 - len(chunk))  # one shape per prompt length
        for ids in generate(params, cfg, chunk, max_new_tokens=MAX_NEW_TOKENS, eos_id=eos)[:len(prompts) - lo]:
            out.append(decode(tokenizer, ids[:-1] if ids and ids[-1] == eos else ids))
    return out


def ensure_pairs(hf_dir: Path, sizes: tuple = SIZES, pairs_dir: Path = PAIRS_DIR) -> tuple[Path, Path]:
    """The demo pairs of the model at ``hf_dir`` in ``pairs_dir`` (train.jsonl, eval.jsonl), made unless
    that model's pairs of these sizes are there."""
    from sft_jax.demos.pairs import demo_pair_examples, make_pairs, write_jsonl

    key = hashlib.sha1((hf_dir / "model.safetensors").read_bytes()).hexdigest()
    meta = pairs_dir / "meta.json"
    train, held_out = pairs_dir / "train.jsonl", pairs_dir / "eval.jsonl"
    made = json.loads(meta.read_text()) if meta.is_file() else {}
    if made.get("sft_model") == key and made.get("prompts") == list(sizes[:2]) and train.is_file() and held_out.is_file():
        return train, held_out
    t0 = time.perf_counter()
    counts = {}
    for examples, path in zip(demo_pair_examples(*sizes[:2]), (train, held_out)):
        rows = make_pairs(examples, greedy_answers(hf_dir, examples))
        write_jsonl(rows, path)
        counts[path.name] = {"pairs": len(rows), "model_made": sum(r["rejected_source"] == "model" for r in rows)}
    meta.write_text(json.dumps({"sft_model": key, "prompts": list(sizes[:2]), **counts}, indent=2))
    print(f"sft_jax: wrote demo pairs to {pairs_dir} in {time.perf_counter() - t0:.0f} s: {counts}", flush=True)
    return train, held_out


def held_out_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_source(correct: np.ndarray, rows: list[dict]) -> dict[str, float]:
    out = {"all": float(np.mean(correct))}
    for source in ("model", "corrupted"):
        mask = np.array([r["rejected_source"] == source for r in rows])
        out[f"{source} ({int(mask.sum())})"] = float(np.mean(correct[mask])) if mask.any() else float("nan")
    return out


def dpo_demo(overrides: tuple = (), *, devices=None, sizes: tuple = SIZES) -> dict | None:
    """Run the DPO demo (``overrides`` on configs/dpo_demo.yaml); its figures, printed and returned
    (None if the run stopped early, e.g. on SIGTERM)."""
    from sft_jax.config import load_config
    from sft_jax.core import loop as core_loop
    from sft_jax.demos.tasks import make_demo_examples
    from sft_jax.objectives.rewards import exact_match
    from sft_jax.objectives.dpo import DPOObjective

    t0 = time.perf_counter()
    sft_hf = ensure_sft_model()
    _, held_out = ensure_pairs(sft_hf, sizes)
    config = load_config("dpo_demo", list(overrides))
    result = core_loop.run(config, DPOObjective, devices=devices)
    if result.status != "done":
        return None
    policy_hf = Path(config.run.output_dir) / "hf"
    examples = make_demo_examples(sizes[1], config.train.seed, "heldout")[:sizes[2]]
    refs = [ex["output"] for ex in examples]
    em_sft = exact_match(greedy_answers(sft_hf, examples), refs)
    em_dpo = exact_match(greedy_answers(policy_hf, examples), refs)
    rows = held_out_rows(held_out)
    margins = implicit_margins(policy_hf, sft_hf, held_out, config)
    accuracy = by_source(margins > 0, rows)
    em_bar = em_sft - EXACT_MATCH_MARGIN
    print(f"exact match on SFT's {len(examples)} held-out prompts: SFT {em_sft:.3f}, DPO {em_dpo:.3f}: "
          f"{_verdict(em_dpo, em_bar)} (bar: DPO >= SFT - {EXACT_MATCH_MARGIN} = {em_bar:.3f})")
    print(f"preference accuracy on {len(rows)} held-out pairs (implicit reward of chosen > rejected): "
          + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
          + f": {_verdict(accuracy['all'], ACCURACY_BAR)} (bar: all >= {ACCURACY_BAR})")
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")
    return {"exact_match_sft": em_sft, "exact_match_dpo": em_dpo, "accuracy": accuracy}


def _verdict(value: float, bar: float) -> str:
    return "ok" if value >= bar else "BELOW"


def implicit_margins(policy_hf: Path, reference_hf: Path, pairs_file: Path, config) -> np.ndarray:
    """beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)] per held-out pair, in file order."""
    from sft_jax.data.preference import assemble_pairs, build_preference_datasets
    from sft_jax.models import hf_io as hf
    from sft_jax.objectives.preference_losses import sequence_logps
    from sft_jax.models.tokenizer import load_tokenizer

    cfg, policy = hf.load_hf(policy_hf, dtype="float32")
    reference = hf.load_hf(reference_hf, dtype="float32")[1]
    data_cfg = config.data.__class__.from_dict({"train": str(pairs_file), "format": "preference",
                                                "max_length": config.data.max_length, "shuffle": False,
                                                "eval_fraction": 0.0})
    dataset = build_preference_datasets(data_cfg, load_tokenizer(str(policy_hf)),
                                        n_positions=cfg.max_position_embeddings, vocab_size=cfg.vocab_size, seed=0)[0]
    logps = jax.jit(lambda p, b: sequence_logps(p, b, cfg))
    out = []
    order = np.arange(len(dataset))
    for lo in range(0, len(dataset), 64):
        ids = order[lo:lo + 64].tolist()
        batch = assemble_pairs(dataset, [[i] for i in ids] + [[]] * (64 - len(ids)), config.data.max_length, 1)
        diff = np.asarray(logps(policy, batch)) - np.asarray(logps(reference, batch))  # (64, 2)
        out.append(config.dpo.beta * (diff[:len(ids), 0] - diff[:len(ids), 1]))
    margins = np.concatenate(out)
    rows = held_out_rows(pairs_file)
    at = {}  # identical rows (the generator repeats some prompts) share one margin
    for k, r in enumerate(rows):
        at.setdefault(_row_key(r), []).append(k)
    result = np.full(len(rows), np.nan)
    for m, i in zip(margins, order):
        result[at[_row_key(dataset.pairs[i])]] = m
    if np.isnan(result).any():
        raise RuntimeError(f"{pairs_file}: {int(np.isnan(result).sum())} held-out pairs were not scored")
    return result


def _row_key(pair: dict) -> str:
    from sft_jax.data.preference import to_pair

    pair = to_pair({k: pair[k] for k in ("prompt", "chosen", "rejected")}, "preference")
    return json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True)


def make_rl_demo_pairs_if_absent(config) -> None:
    """``python -m sft_jax.reward --config rl_reward_demo``: its pairs come from the RL demo's SFT start
    (chosen = the correct answer, rejected = that model's own mistakes, mostly signed-off answers, or
    the task's corruption); made, with that start, when absent."""
    if config.data.train == str(RL_PAIRS_DIR / "train.jsonl"):
        ensure_pairs(ensure_sft_model(RL_SFT_DIR, "rl_sft_demo"), pairs_dir=RL_PAIRS_DIR)


def reward_demo(overrides: tuple = (), *, devices=None, sizes: tuple = SIZES) -> dict | None:
    """Run the reward-model demo; its held-out accuracy, printed and returned (None: stopped early)."""
    from sft_jax.config import load_config
    from sft_jax.core import loop as core_loop
    from sft_jax.objectives.reward import RewardObjective
    from sft_jax.inference.scoring import RewardScorer

    t0 = time.perf_counter()
    _, held_out = ensure_pairs(ensure_sft_model(), sizes)
    config = load_config("reward_demo", list(overrides))
    result = core_loop.run(config, RewardObjective, devices=devices)
    if result.status != "done":
        return None
    rows = held_out_rows(held_out)
    scorer = RewardScorer(Path(config.run.output_dir) / "hf")
    scores = scorer.score([r["prompt"] + [{"role": "assistant", "content": r[h]}] for r in rows
                           for h in ("chosen", "rejected")]).reshape(-1, 2)
    accuracy = by_source(scores[:, 0] > scores[:, 1], rows)
    print(f"reward model accuracy on {len(rows)} held-out pairs (chosen scored higher): "
          + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")
    return {"accuracy": accuracy}


if __name__ == "__main__":
    dpo_demo()
