"""Templates, masks and token-exactness with HF apply_chat_template."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import chats, long_text, nonblank, reloaded, small_tokenizer, text
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sft_jax.data import DataConfig, encode_prompt
from sft_jax.data.formats import BUILTIN_TEMPLATE, Renderer, decode, encode_documents, to_messages

PROPERTY = settings(max_examples=40, deadline=None)

# A user template in ChatML-like style. Its generation prompt ends in a newline and assistant content follows
# directly, so piece boundaries are BPE-safe, like the built-in one. Every message ends in a newline, also after
# the eos of an assistant turn: that newline is template text, never a training target.
USER_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(built-in, user-template) tokenizers, each saved and reloaded through AutoTokenizer."""
    return (
        reloaded(small_tokenizer(BUILTIN_TEMPLATE), tmp_path_factory.mktemp("builtin")),
        reloaded(small_tokenizer(USER_TEMPLATE), tmp_path_factory.mktemp("user")),
    )


def _encode(tokenizer, messages, template=None, **kw):
    renderer = Renderer(tokenizer, template)
    docs = encode_documents([messages], renderer, train_on_prompt=kw.get("train_on_prompt", False),
                            last_turn_only=kw.get("last_turn_only", False))
    return np.array(docs.tokens[0]), np.array(docs.supervised[0]), renderer


def _supervised_runs(tokenizer, tokens, supervised) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    runs, start = [], None
    for t in range(len(tokens) + 1):
        on = t < len(tokens) and supervised[t]
        if on and start is None:
            start = t
        if not on and start is not None:
            runs.append(decode(tokenizer, tokens[start:t]))
            start = None
    return runs


def _check_conversation(tokenizer, messages, template, last_turn_only=False):
    tokens, supervised, _ = _encode(tokenizer, messages, template, last_turn_only=last_turn_only)
    eos = tokenizer.eos_token
    responses = [m["content"].strip() + eos for m in messages if m["role"] == "assistant"]
    expected = responses[-1:] if last_turn_only else responses
    # built-in or user template: the supervised runs are exactly the responses, each closed by its eos
    assert _supervised_runs(tokenizer, tokens, supervised) == expected
    # the whole row is the template applied to the conversation
    assert decode(tokenizer, tokens) == tokenizer.apply_chat_template(messages, tokenize=False)
    # the generation prompt of every assistant turn is exactly the training prefix before that turn
    starts = [0] + [t for t in range(1, len(tokens)) if supervised[t] and not supervised[t - 1]]
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not last_turn_only:
        for k, start in zip(turns, starts[1:]):
            prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True)
            assert prompt["input_ids"] == tokens[:start].tolist()


@PROPERTY
@given(instruction=st.one_of(text, long_text), extra=text, output=nonblank)
@example(instruction="", extra="", output="x")  # empty instruction and input
@example(instruction="Translate.", extra="", output=" naïve 東京 🙂 ")  # no input; unicode, padded output
def test_alpaca_masks_and_prompt_tokens(tokenizers, instruction, extra, output):
    builtin, _ = tokenizers
    messages = to_messages({"instruction": instruction, "input": extra, "output": output}, "alpaca")
    _check_conversation(builtin, messages, None)
    tokens, _, _ = _encode(builtin, messages)
    cfg = DataConfig()
    prompt = encode_prompt(builtin, cfg, {"instruction": instruction, "input": extra, "output": output})
    assert prompt == builtin.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
    assert tokens[: len(prompt)].tolist() == prompt


@PROPERTY
@given(prompt=st.one_of(text, long_text), completion=nonblank)
def test_prompt_completion_masks(tokenizers, prompt, completion):
    builtin, _ = tokenizers
    _check_conversation(builtin, to_messages({"prompt": prompt, "completion": completion}, "prompt_completion"), None)


@PROPERTY
@given(messages=chats(), last_turn_only=st.booleans())
def test_chat_masks_builtin_template(tokenizers, messages, last_turn_only):
    builtin, _ = tokenizers
    _check_conversation(builtin, messages, None, last_turn_only)


@PROPERTY
@given(messages=chats())
def test_chat_masks_user_template(tokenizers, messages):
    _, user = tokenizers
    _check_conversation(user, messages, USER_TEMPLATE)


@PROPERTY
@given(messages=chats())
def test_python_rendering_matches_jinja(tokenizers, messages):
    builtin, _ = tokenizers
    fast, jinja = Renderer(builtin, None), Renderer(builtin, BUILTIN_TEMPLATE)
    assert fast.pieces(messages) == jinja.pieces(messages)
    assert fast.generation_prompt(messages) == jinja.generation_prompt(messages)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_train_on_prompt_supervises_everything_but_the_first_token(tmp_path, train_on_prompt):
    """Through the real path (data.train_on_prompt, build_datasets, the packed batch): with the
    flag every target inside a document is weighted, i.e. every token but each document's first;
    without it the prompt targets are not. Nothing crosses a document boundary either way."""
    from data_fixtures import alpaca_rows, write_jsonl

    from sft_jax.data import BatchIterator, build_datasets

    tokenizer = small_tokenizer()
    cfg = DataConfig(train=write_jsonl(tmp_path / "a.jsonl", alpaca_rows(12)), format="alpaca", eval_fraction=0.0,
                     train_on_prompt=train_on_prompt, max_length=128)
    train, _, _ = build_datasets(cfg, tokenizer, n_positions=128, vocab_size=len(tokenizer), seed=0)
    batch = BatchIterator(train, global_batch_size=4, seed=0, max_length=128, prefetch=0, loop=False).batch_at(0)
    seg = batch["segment_ids"]
    # target t is tokens[t + 1]: a real target iff t and t + 1 lie in the same document
    in_document = np.zeros(seg.shape, bool)
    in_document[:, :-1] = (seg[:, :-1] > 0) & (seg[:, :-1] == seg[:, 1:])
    assert (seg.max(axis=1) >= 2).any()  # rows hold several documents: the boundaries are exercised
    weights = batch["weights"].astype(bool)
    assert not (weights & ~in_document).any()
    if train_on_prompt:
        np.testing.assert_array_equal(weights, in_document)
    else:
        assert 0 < weights.sum() < 0.5 * in_document.sum()  # the prompts (most tokens here) are not targets


def test_template_without_eos_is_rejected():
    from sft_jax.data import DataError

    tokenizer = small_tokenizer(None)
    no_eos = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}A:\n{% endif %}{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}A:\n{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match="eos"):
        Renderer(tokenizer, no_eos).pieces(messages)


def test_unsafe_user_template_is_caught(tmp_path):
    """A prompt ending in a space merges with the response in BPE, so turn 2's prompt differs from training."""
    from data_fixtures import write_jsonl

    from sft_jax.data import DataError, build_datasets

    tokenizer = small_tokenizer(None)
    unsafe = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    turns = ["hi", "the end.", "and?", "the other end."]  # " the" is one token in context
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(turns)]
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": chat}] * 3)
    cfg = DataConfig(train=path, template=unsafe, eval_fraction=0.0)
    with pytest.raises(DataError, match="BPE"):
        build_datasets(cfg, tokenizer, n_positions=1024, vocab_size=len(tokenizer), seed=0)


@pytest.mark.parametrize("user_template", [False, True])
def test_exported_tokenizer_reproduces_the_training_prompts(tmp_path, user_template):
    """Through the real path: build_datasets on a file (the user template given as a .jinja file),
    export_hf with the run's chat template, AutoTokenizer on the exported dir: for every example,
    apply_chat_template(messages before the last response, add_generation_prompt=True) is exactly
    the token prefix the model was trained on before that response."""
    import flax.linen as nn
    import jax
    from data_fixtures import write_jsonl
    from transformers import AutoTokenizer

    from sft_jax.models import hf_io as hf
    from sft_jax.data import build_datasets, chat_template
    from sft_jax.models.gpt2 import GPT2Config, param_shapes

    template = None
    if user_template:
        template = str(tmp_path / "chat.jinja")
        (tmp_path / "chat.jinja").write_text(USER_TEMPLATE)
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q {i}"},
                           {"role": "assistant", "content": f"a {i}"}, {"role": "user", "content": "and? ü"},
                           {"role": "assistant", "content": f" more {i}\n"}]} for i in range(5)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "chats.jsonl", chats), template=template, eval_fraction=0.0)
    tokenizer = small_tokenizer(None)
    train, _, _ = build_datasets(cfg, tokenizer, n_positions=1024, vocab_size=len(tokenizer), seed=0)
    model_cfg = GPT2Config.preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.eos_token_id)
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(param_shapes(model_cfg)))
    hf.export_hf(params, model_cfg, tmp_path / "hf", tokenizer=tokenizer, chat_template=chat_template(cfg),
                 verify=False)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported.chat_template == (USER_TEMPLATE if user_template else BUILTIN_TEMPLATE)
    for i, messages in enumerate(train.examples):
        tokens, supervised = train.doc(i)
        last_start = max(t for t in range(1, len(tokens)) if supervised[t] and not supervised[t - 1])
        prompt = exported.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
        assert prompt == tokens[:last_start].tolist()
