"""Generate a completion from an HF dir, a hub name or an orbax checkpoint.

  python -m sft_jax.generate --model PATH --prompt TEXT [--max-new-tokens N] [--temperature T]
                             [--top-k K] [--top-p P] [--seed S] [--raw]

By default the prompt goes through the tokenizer's chat template (one user message, generation
prompt added) when it has one; --raw feeds the text as is.
"""

from __future__ import annotations

import argparse
import sys

from sft_jax import checkpoint, sampling


def encode_prompt(tokenizer, prompt: str, raw: bool) -> list[int]:
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF dir, hub name, or orbax checkpoint (root or step dir)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="skip the chat template")
    args = parser.parse_args(argv)
    try:
        cfg, params, tokenizer = checkpoint.load_model(args.model)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; cannot encode a text prompt")
        prompt = encode_prompt(tokenizer, args.prompt, args.raw)
        eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
        max_new = min(args.max_new_tokens, cfg.n_positions - len(prompt))
        (completion,) = sampling.generate(params, cfg, [prompt], max_new_tokens=max_new, temperature=args.temperature,
                                          top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if completion and completion[-1] == eos_id:
        completion = completion[:-1]
    print(tokenizer.decode(completion, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
