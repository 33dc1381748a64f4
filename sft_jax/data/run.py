"""The data a training run builds from its config: SFT and PPO read examples, DPO and the reward model read
preference pairs.

The objectives (sft_jax/objectives) and `python -m sft_jax.data` both call `run_datasets`, with the same
arguments, so the report printed before a run is the one the run writes to data_report.md, and (for examples)
the tokenized cache built for the report is the one the run then maps.
"""

from __future__ import annotations

from sft_jax.data.rows import DEMO_SOURCES, BadRows, locate, nonblank_lines, open_parts, parse_line, parse_sources

OBJECTIVES = ("sft", "ppo", "dpo", "reward")  # the training commands
PAIR_OBJECTIVES = ("dpo", "reward")  # those that train on preference pairs


def run_datasets(config, tokenizer, model_cfg, *, pairs: bool):
    """(train, eval | None, report) of `config` (a sft_jax.config.Config) for a model of `model_cfg`: preference
    pairs (sft_jax.data.preference) when `pairs`, else examples; `report.to_markdown()` is the run's
    data_report.md."""
    size = dict(n_positions=model_cfg.max_position_embeddings, vocab_size=model_cfg.vocab_size,
                seed=config.train.seed)
    if pairs:
        from sft_jax.data.preference import build_preference_datasets

        return build_preference_datasets(config.data, tokenizer, **size)
    from sft_jax.data.sources import build_datasets

    return build_datasets(config.data, tokenizer, global_batch_size=config.train.global_batch_size, **size)


def reads_pairs(data_cfg) -> bool:
    """Whether data.train holds preference pairs: data.format names a preference-only format, or (auto,
    sharegpt) the first row of the first source has `chosen` and `rejected` (as data.columns names them)."""
    from sft_jax.data.preference import PREFERENCE_FORMATS

    if data_cfg.format in set(PREFERENCE_FORMATS) - {"sharegpt"}:
        return True
    if data_cfg.format not in ("auto", "sharegpt"):
        return False
    source = parse_sources(data_cfg.train)[0]
    if source.name in DEMO_SOURCES:
        return False
    columns = source.columns if source.columns is not None else data_cfg.columns or {}
    # an empty file is counted, not raised, here: the build that follows reports it in its place
    first_rows = (_first_row(part) for part in open_parts(locate(source.name), BadRows("skip")))
    row = next((row for row in first_rows if row), None)
    return row is not None and all(columns.get(field, field) in row for field in ("chosen", "rejected"))


def _first_row(part) -> dict | None:
    if not part.json_lines:
        return part.sample()
    for _, raw in nonblank_lines(part.name):
        row, _ = parse_line(raw)
        if isinstance(row, dict):
            return row
    return None
