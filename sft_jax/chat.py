"""Chat with a model: ``python -m sft_jax.chat --model PATH [--adapter DIR] [--system TEXT] [sampling flags]``

PATH is an HF dir, a hub name or a training checkpoint (root = newest step, or a step dir).
Each user message joins the conversation, which is rendered with the tokenizer's chat template
(the one the run trained with); the reply streams token by token. Greedy by default; the
sampling flags are ``generate``'s. ``/reset`` starts over (keeping ``--system``), ``/exit`` or
end of input quits; blank lines and commands print nothing. When the history plus ``--max-new-tokens`` no longer fits the context,
the oldest whole turns are dropped (the system message stays), with a one-line notice.

With stdin not a terminal there is no banner and no prompt: one message per line in, each
reply on one line out (newlines inside a reply become spaces), exit 0 at end of input.

Decoding: one jitted prefill of the rendered conversation into a KV cache as long as the model's
context, then a jitted one-token step called from a Python loop, the cache staying on device.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import cli
from sft_jax.generate import add_sampling_args, fit_prompt, load
from sft_jax.models.family import stop_token_ids
from sft_jax.inference.sampling import _next_token
from sft_jax.models.family import ModelConfig, family_of

PREFILL_MULTIPLE = 64  # prompts are left-padded to a multiple of this: few prefill compiles


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill(params, tokens, length, *, cfg: ModelConfig):
    """tokens (1,T0) left-padded, ``length`` real tokens -> (last logits (1,V), cache)."""
    T0 = tokens.shape[1]
    slot = jnp.arange(T0)[None, :]
    first_real = T0 - length
    segment_ids = (slot >= first_real).astype(jnp.int32)  # pad slots are segment 0: never attended
    positions = jnp.maximum(slot - first_real, 0)
    family = family_of(cfg)
    cache = family.init_cache(cfg, 1, cfg.max_position_embeddings)
    logits, cache = family.module(cfg).apply(params, tokens, positions, segment_ids, cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("cfg", "greedy", "top_k"), donate_argnames=("cache",))
def decode_step(params, cache, logits, position, rng, temperature, top_p, *, cfg: ModelConfig,
                greedy: bool, top_k: int):
    """Pick the next token from ``logits`` (1,V) and feed it at ``position``: (token (1,), logits, cache)."""
    token = _next_token(logits, rng, temperature, top_p, greedy=greedy, top_k=top_k)
    logits, cache = family_of(cfg).module(cfg).apply(params, token[:, None], position.reshape(1, 1),
                                                     jnp.ones((1, 1), jnp.int32), cache=cache)
    return token, logits[:, 0], cache


class Chat:
    """A conversation with one model; ``reply(text)`` yields the answer in pieces as it decodes."""

    def __init__(self, cfg: ModelConfig, params, tokenizer, eos_id: int, *, system: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, notice=print):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; train with sft_jax (it stores one) or use "
                             "python -m sft_jax.generate --raw")
        if max_new_tokens < 1 or max_new_tokens >= cfg.max_position_embeddings:
            raise ValueError(f"--max-new-tokens={max_new_tokens} must be between 1 and n_positions - 1 "
                             f"({cfg.max_position_embeddings - 1})")
        if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        self.cfg, self.params, self.tokenizer, self.eos_id = cfg, params, tokenizer, eos_id
        self.system, self.max_new_tokens = system, max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = jax.random.key(seed)
        self.notice = notice
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self) -> list[int]:
        """The conversation's tokens; drops the oldest whole turns (not the system message) to fit."""
        room = self.cfg.max_position_embeddings - self.max_new_tokens
        ids = self.encode(self.messages)
        dropped = 0
        while len(ids) > room:
            head = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            later_users = [i for i, m in enumerate(self.messages) if m["role"] == "user" and i > head]
            if not later_users:  # only the current message is left: cut it from the left
                return fit_prompt(ids, self.max_new_tokens, self.cfg.max_position_embeddings)
            dropped += later_users[0] - head
            self.messages = self.messages[:head] + self.messages[later_users[0]:]
            ids = self.encode(self.messages)
        if dropped:
            self.notice(f"(dropped the {dropped} oldest messages to fit {self.cfg.max_position_embeddings} positions)")
        return ids

    def reply(self, text: str):
        """Add the user's ``text``, then yield the reply's text in pieces as tokens arrive."""
        self.messages.append({"role": "user", "content": text})
        ids = self.prompt()
        room = self.cfg.max_position_embeddings - self.max_new_tokens
        T0 = min(-(-len(ids) // PREFILL_MULTIPLE) * PREFILL_MULTIPLE, room)
        tokens = np.full((1, T0), self.eos_id, np.int32)
        tokens[0, T0 - len(ids):] = ids
        logits, cache = prefill(self.params, jnp.asarray(tokens), jnp.int32(len(ids)), cfg=self.cfg)
        temperature, top_p = jnp.float32(max(self.temperature, 1e-6)), jnp.float32(self.top_p)
        new: list[int] = []
        shown = ""
        for i in range(self.max_new_tokens):
            self.rng, step_rng = jax.random.split(self.rng)
            token, logits, cache = decode_step(self.params, cache, logits, jnp.int32(len(ids) + i), step_rng,
                                               temperature, top_p, cfg=self.cfg, greedy=self.temperature == 0.0,
                                               top_k=self.top_k)
            token = int(token[0])
            if token == self.eos_id or token in stop_token_ids(self.cfg):  # any end-of-turn id ends the reply
                break
            new.append(token)
            text_so_far = self.tokenizer.decode(new, skip_special_tokens=True)
            if not text_so_far.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text_so_far[len(shown):]
                shown = text_so_far
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        if len(answer) > len(shown):
            yield answer[len(shown):]
        self.messages.append({"role": "assistant", "content": answer})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF dir, hub name, or orbax checkpoint (root or step dir)")
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory applied on top of --model")
    parser.add_argument("--system", default=None, help="system message kept at the top of the conversation")
    add_sampling_args(parser, max_new_tokens=None)  # None: min(256, n_positions // 2)
    args = cli.parse(parser, argv)
    interactive = sys.stdin.isatty()
    try:
        cfg, params, tokenizer, eos_id = load(args.model, args.adapter)
        max_new = args.max_new_tokens or min(256, cfg.max_position_embeddings // 2)
        chat = Chat(cfg, params, tokenizer, eos_id, system=args.system, max_new_tokens=max_new,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    notice=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:  # CheckpointError, HFFormatError, bad flags, missing files
        return cli.user_error(e)
    if interactive:
        print(f"chatting with {args.model} ({cfg.max_position_embeddings} positions); /reset starts over, "
              f"/exit quits")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return 0
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            chat.reset()
            if interactive:
                print("(conversation reset)")
            continue
        if not command:
            continue
        for piece in chat.reply(line):
            sys.stdout.write(piece if interactive else piece.replace("\r", " ").replace("\n", " "))
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
