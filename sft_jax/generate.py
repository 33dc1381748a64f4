"""Generate a completion from an HF dir, a hub name or an orbax checkpoint.

  python -m sft_jax.generate --model PATH [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--temperature T]
                             [--top-k K] [--top-p P] [--seed S] [--raw]

By default the prompt goes through the tokenizer's chat template (one user message, generation
prompt added) when it has one; --raw feeds the text as is. A prompt longer than
``n_positions - max_new_tokens`` is cut from the left, with a one-line warning.
For a conversation, see ``python -m sft_jax.chat``.
"""

from __future__ import annotations

import argparse
import sys

from sft_jax import cli
from sft_jax.core import checkpoint
from sft_jax.inference import sampling
from sft_jax.models.family import stop_token_ids


def encode_prompt(tokenizer, prompt: str, raw: bool) -> list[int]:
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def fit_prompt(prompt: list[int], max_new_tokens: int, n_positions: int) -> list[int]:
    """``prompt`` cut from the left so that it plus ``max_new_tokens`` fits the context, with a
    one-line warning on stderr when it is cut; ValueError if no prompt token would be left."""
    room = n_positions - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"{n_positions} positions")
    if len(prompt) > room:
        print(f"warning: prompt of {len(prompt)} tokens cut from the left to {room} "
              f"(n_positions {n_positions} - max_new_tokens {max_new_tokens})", file=sys.stderr, flush=True)
        prompt = prompt[-room:]
    return prompt


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int | None = 64) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed (shared with sft_jax.chat)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def load(model: str, adapter: str | None = None):
    """(model config, params, tokenizer, eos_id) for ``--model``, with the PEFT LoRA ``adapter``
    merged in if given; ValueError without a tokenizer or for an adapter that does not fit."""
    cfg, params, tokenizer = checkpoint.load_model(cli.resolve_path(model))
    if adapter is not None:
        from sft_jax.adapters import lora

        spec, adapters = lora.load_peft(cli.resolve_path(adapter), cfg)
        params = lora.merge(params, adapters, spec)
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer; cannot encode a text prompt")
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
    return cfg, params, tokenizer, eos_id


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF dir, hub name, or orbax checkpoint (root or step dir)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory applied on top of --model")
    add_sampling_args(parser)
    parser.add_argument("--raw", action="store_true", help="skip the chat template")
    args = cli.parse(parser, argv)
    try:
        cfg, params, tokenizer, eos_id = load(args.model, args.adapter)
        prompt = fit_prompt(encode_prompt(tokenizer, args.prompt, args.raw), args.max_new_tokens,
                            cfg.max_position_embeddings)
        (completion,) = sampling.generate(params, cfg, [prompt], max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                          eos_id=eos_id, stop_ids=stop_token_ids(cfg), seed=args.seed)
    except (ValueError, OSError) as e:  # CheckpointError, HFFormatError, bad flags, missing files
        return cli.user_error(e)
    if completion and completion[-1] in (eos_id, *stop_token_ids(cfg)):
        completion = completion[:-1]
    print(tokenizer.decode(completion, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
