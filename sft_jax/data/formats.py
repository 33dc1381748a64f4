"""Example formats, the chat template, and segment tokenization that yields the loss mask by construction.

Every format is first mapped to chat messages ({"role", "content"}, roles system/user/assistant):

    alpaca             user = instruction, or instruction + "\\n\\n" + input when input is non-empty;
                       assistant = output
    prompt_completion  strings: user = prompt; assistant = completion. Lists of messages (TRL's conversational
                       prompt-completion): the `prompt` messages (earlier assistant turns allowed), then the one
                       assistant message `completion` holds; only that completion is a target, as in TRL
    chat               the `messages` (or `conversations`) list of {role, content} as given (multi-turn; system
                       messages allowed anywhere)
    sharegpt           the `conversations` (or `messages`) list of {from, value} (LLaMA-Factory, axolotl, FastChat):
                       from human/user, gpt/assistant, system; an optional `system` column; after an optional
                       first system turn, turns alternate user, assistant, user, ... from the user
    demo               the built-in demo tasks, alpaca-style

A file whose names differ from these maps them with data.columns (our field -> the file's name, see Names):
columns (instruction, output, messages, ...), the keys of a message (role, content) and role names (user,
assistant, system_role). Errors name the file's own names.

Built-in template (GPT-2 has none). Message contents are stripped of surrounding whitespace; messages are
joined by a blank line; each assistant message ends with the eos token; the generation prompt is the
assistant header. A single-turn alpaca example renders as

    ### User:
    {instruction}

    {input}

    ### Assistant:
    {output}<|endoftext|>

and a chat as
    "### System:\\n{system}\\n\\n### User:\\n{u1}\\n\\n### Assistant:\\n{a1}<|endoftext|>\\n\\n### User:\\n{u2}..."

The sequence is assembled from pieces that are tokenized separately and labelled as they are placed: a prompt
piece is all text from the previous response's end up to and including "### Assistant:\\n"; a response piece
is the stripped assistant content followed by the eos token. No token stream is searched for a marker.

Why this matches `apply_chat_template(messages, add_generation_prompt=True)` token for token: that call
tokenizes the whole rendered prefix at once, while training tokenizes pieces apart. The two agree when no
byte-level BPE pre-token spans a piece boundary. The only boundaries are (a) prompt -> response: the prompt
ends in ":\\n", a lone newline after a non-space, and the response starts with a non-space (it is stripped),
so GPT-2's pre-tokenizer regex splits right there; (b) response -> next prompt: the eos special token sits
between them, and special tokens split the text before pre-tokenization. A user Jinja template gets its
pieces by rendering prefixes of the conversation (prompt k = render(messages[:k], add_generation_prompt),
response k = render(messages[:k+1]) minus that prefix, up to and including the token that closes it: the eos,
or the special token that ends the turn when the template closes turns with another one, such as Llama 3's
<|eot_id|> under a base tokenizer whose eos is <|end_of_text|>; template text after that token opens the next
prompt piece, so it is never a target), and `check_prompt_tokens` verifies the agreement on real examples
because an arbitrary template can put a boundary inside a pre-token. The closing token is a stop id of the
model (`turn_end_token_id`), so generation, exact match and rollouts end where training taught the turn ends.

No double BOS: every piece is tokenized with add_special_tokens=False, so a document is exactly the template's
rendering, as `apply_chat_template(..., tokenize=True)` gives it. A template that renders `{{ bos_token }}`
gets one BOS; the tokenizer's own add-BOS setting never adds a second.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from sft_jax.data.config import DataConfig, DataError
from sft_jax.models.tokenizer import read_template

ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "prompt_completion", "chat", "sharegpt", "demo")
MESSAGE_LISTS = ("messages", "conversations")  # where chat and sharegpt rows keep their messages
SHAREGPT_KEYS = {"role": "from", "content": "value"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLE_FIELDS = {"user": "user", "assistant": "assistant", "system_role": "system"}  # data.columns key -> role
_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
_SEPARATOR = "\n\n"

# HF renders chat templates with trim_blocks and lstrip_blocks; every tag here uses "-" so layout never leaks.
BUILTIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ '### System:\\n' + (message['content'] | trim) }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + (message['content'] | trim) }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\\n' + (message['content'] | trim) + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages -%}{{ '\\n\\n' }}{%- endif -%}{{ '### Assistant:\\n' }}"
    "{%- endif -%}"
)


class FieldError(Exception):
    """A bad field in one example; the caller adds the file and line and raises DataError or counts it."""

    def __init__(self, reason: str, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.reason = reason  # key of the drop counter in the report, e.g. "missing_field"
        self.field = field
        self.detail = message


# ----------------------------------------------------------------------------------------------- formats


@dataclasses.dataclass(frozen=True)
class Names:
    """A source's names for our fields: data.columns over the format's own names.

    fields: our field -> the file's column or message key; roles: the file's role name -> our role; lists: the
    columns that may hold the messages, the first one a row has is read."""

    fields: dict
    roles: dict
    lists: tuple

    @classmethod
    def of(cls, fmt: str, columns: dict | None = None) -> Names:
        columns = dict(columns or {})
        sharegpt = fmt == "sharegpt"
        roles = dict(SHAREGPT_ROLES) if sharegpt else {role: role for role in ROLES}
        for key, role in ROLE_FIELDS.items():
            if key in columns:  # a role named in data.columns replaces the format's names for that role
                roles = {name: ours for name, ours in roles.items() if ours != role}
                roles[columns.pop(key)] = role
        fields = {**(SHAREGPT_KEYS if sharegpt else {}), **columns}
        if "messages" in columns:
            lists = (columns["messages"],)
        else:
            lists = MESSAGE_LISTS[::-1] if sharegpt else MESSAGE_LISTS
        return cls(fields, roles, lists)

    def __getitem__(self, field: str) -> str:
        return self.fields.get(field, field)

    def message_list(self, row: dict) -> str:
        return next((name for name in self.lists if name in row), self.lists[0])


def detect_format(columns, where: str, sample: dict | None = None, mapping: dict | None = None) -> str:
    """Pick the format from a source's column names (as data.columns maps them to ours) and, for a list of
    messages, from the first message of `sample` (a row): chat if chat's names read its role ({role: user}),
    else sharegpt if sharegpt's do ({from: human}), else by the column: conversations is sharegpt."""
    columns = set(columns)
    mapping = mapping or {}
    ours = {({theirs: field for field, theirs in mapping.items()}).get(c, c) for c in columns}
    lists = [c for c in ((mapping["messages"],) if "messages" in mapping else MESSAGE_LISTS) if c in columns]
    if lists:
        first = _first_message(sample, lists[0]) or {}
        for fmt in ("chat", "sharegpt"):
            names = Names.of(fmt, mapping)
            if isinstance(first.get(names["role"]), str) and first[names["role"]] in names.roles:
                return fmt
        return "sharegpt" if lists[0] == "conversations" else "chat"
    if {"instruction", "output"} <= ours:
        return "alpaca"
    if {"prompt", "completion"} <= ours:
        return "prompt_completion"
    hint = columns_hint(columns, sample)
    if {"chosen", "rejected"} <= ours:
        hint = ("; these are preference pairs, read by python -m sft_jax.dpo and python -m sft_jax.reward "
                "(python -m sft_jax.data --objective dpo reports on them)")
    raise DataError(
        f"{where}: cannot detect the format from columns {sorted(columns)}; expected 'messages' or 'conversations' "
        "(chat, sharegpt), 'instruction'+'output' (alpaca) or 'prompt'+'completion' (prompt_completion), or set "
        f"data.format{hint}"
    )


def _first_message(sample, column: str):
    messages = sample.get(column) if isinstance(sample, dict) else None
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return messages[0]
    return None


def columns_hint(columns, sample: dict | None, fields: tuple = ("instruction", "output")) -> str:
    """Which data.columns would name a source's columns as ours, guessed from what they hold: a list of
    messages, or text columns in their order in the row for `fields`."""
    order = [c for c in sample if c in columns] if isinstance(sample, dict) else sorted(columns)
    lists = [c for c in order if _first_message(sample, c) is not None]
    if lists:
        return (f"; if '{lists[0]}' holds the messages, name it with data.columns: {{messages: {lists[0]}}} (and "
                "role, content, user, assistant if its messages use other names)")
    texts = [c for c in order if not isinstance(sample, dict) or isinstance(sample.get(c), str)]
    if len(texts) >= len(fields):
        example = ", ".join(f"{ours}: {theirs}" for ours, theirs in zip(fields, texts))
        return (f"; if these columns hold the examples under other names, map them with data.columns, e.g. "
                f"{{{example}}}")
    return "; if these columns hold the examples under other names, map them with data.columns"


def _text(row: dict, field: str, *, required: bool = True) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise FieldError("missing_field", field, "missing")
        return ""
    if not isinstance(value, str):
        raise FieldError("wrong_type", field, f"expected a string, got {type(value).__name__}")
    return value


def _response(row: dict, field: str) -> str:
    value = _text(row, field)
    if not value.strip():
        raise FieldError("empty_response", field, "empty response")
    return value


def to_messages(row: dict, fmt: str, names: Names | None = None) -> list[dict]:
    """Validate one example of format `fmt` (named as `names` says) and return its chat messages; raises FieldError.

    A missing top-level field names the row's keys and, when they fit another format, the
    `data.format` that reads them (a chat file under `data.format=alpaca`)."""
    try:
        return _to_messages(row, fmt, names or _own_names(fmt))
    except FieldError as e:
        if e.reason != "missing_field" or "." in e.field or "[" in e.field:
            raise
        hint = f"; the row has keys {sorted(row)}"
        try:
            other = detect_format(row, "row", row)
        except DataError:
            other = None
        if other and other != fmt:
            hint += f", which data.format={other} reads"
        elif not other:
            hint += columns_hint(row, row)
        raise FieldError(e.reason, e.field, e.detail + hint) from None


@functools.lru_cache(maxsize=None)
def _own_names(fmt: str) -> Names:
    return Names.of(fmt)


def _to_messages(row: dict, fmt: str, names: Names) -> list[dict]:
    if not isinstance(row, dict):
        raise FieldError("wrong_type", "<row>", f"expected an object, got {type(row).__name__}")
    if fmt in ("alpaca", "demo"):
        instruction = _text(row, names["instruction"]).strip()
        extra = _text(row, names["input"], required=False).strip()
        user = instruction + _SEPARATOR + extra if extra else instruction
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": _response(row, names["output"])}]
    if fmt == "prompt_completion":
        if isinstance(row.get(names["prompt"]), list) or isinstance(row.get(names["completion"]), list):
            return _conversational_prompt_completion(row, names)
        return [
            {"role": "user", "content": _text(row, names["prompt"])},
            {"role": "assistant", "content": _response(row, names["completion"])},
        ]
    if fmt == "chat":
        return _chat_messages(row, names)
    if fmt == "sharegpt":
        messages = sharegpt_messages(row, names)
        if not any(m["role"] == "assistant" for m in messages):
            raise FieldError("no_response", names.message_list(row), "no assistant turn to train on")
        return messages
    raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def message(value, names: Names) -> dict:
    """One {role, content} message (in the file's names) as ours; an assistant's content must not be empty."""
    if not isinstance(value, dict):
        raise FieldError("wrong_type", "", f"expected an object, got {type(value).__name__}")
    role_key, content_key = names["role"], names["content"]
    if role_key not in value:
        raise FieldError("missing_field", role_key, f"missing; the message has keys {sorted(value)}; name the "
                         f"file's message keys with data.columns, e.g. {{role: ..., content: ...}}")
    name = _text(value, role_key)
    role = names.roles.get(name)
    if role is None:
        raise FieldError("unknown_role", role_key, f"unknown role {name!r}; expected one of {tuple(names.roles)} "
                         f"(name other roles with data.columns, e.g. {{user: {name}}})")
    content = _response(value, content_key) if role == "assistant" else _text(value, content_key)
    return {"role": role, "content": content}


def messages_at(value, field: str, names: Names) -> list[dict]:
    """The list of messages in column `field`; errors name the message, e.g. dialog[2].speaker."""
    if not isinstance(value, list):
        raise FieldError("wrong_type", field, f"expected a list of messages, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(message(item, names))
        except FieldError as e:
            raise FieldError(e.reason, f"{field}[{i}]" + (f".{e.field}" if e.field else ""), e.detail) from None
    return out


def _chat_messages(row: dict, names: Names) -> list[dict]:
    field = names.message_list(row)
    if row.get(field) is None:
        raise FieldError("missing_field", field, "missing")
    messages = messages_at(row[field], field, names)
    if not any(m["role"] == "assistant" for m in messages):
        raise FieldError("no_response", field, "no assistant message to train on")
    return messages


def sharegpt_messages(row: dict, names: Names) -> list[dict]:
    """ShareGPT turns as messages: the `system` column's text (if any), then the turns, which after an optional
    first system turn alternate user, assistant, user, ... from the user."""
    field = names.message_list(row)
    if row.get(field) is None:
        raise FieldError("missing_field", field, "missing")
    turns = messages_at(row[field], field, names)
    system = _text(row, names["system"], required=False)
    out = [{"role": "system", "content": system}] if system.strip() else []
    expected = "user"
    for i, turn in enumerate(turns):
        if turn["role"] == "system" and i == 0:
            out.append(turn)
            continue
        if turn["role"] != expected:
            name = row[field][i][names["role"]]
            raise FieldError("not_alternating", f"{field}[{i}].{names['role']}",
                             f"turns must alternate user and assistant, from the user: turn {i + 1} is {name!r} "
                             f"({turn['role']}), expected {expected}")
        out.append(turn)
        expected = "assistant" if expected == "user" else "user"
    return out


def _conversational_prompt_completion(row: dict, names: Names) -> list[dict]:
    """TRL's conversational prompt-completion: `prompt` a list of messages, `completion` one assistant message."""
    fields = names["prompt"], names["completion"]
    for field in fields:
        if row.get(field) is None:
            raise FieldError("missing_field", field, "missing")
        if not isinstance(row[field], list):
            raise FieldError("wrong_type", field, f"expected a list of messages (the other of {list(fields)} is "
                             f"one), got {type(row[field]).__name__}")
    prompt = messages_at(row[fields[0]], fields[0], names)
    completion = messages_at(row[fields[1]], fields[1], names)
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise FieldError("wrong_type", fields[1], "expected one assistant message, got "
                         f"{[m['role'] for m in completion]}")
    return prompt + completion


def messages_of(example, fmt: str = "auto") -> list[dict]:
    """Messages from a messages list or an example dict of any format (auto-detected from its keys)."""
    if isinstance(example, list):
        return messages_at(example, "messages", _own_names("chat"))
    if fmt == "auto":
        fmt = detect_format(example.keys(), "example", example)
    return to_messages(example, fmt)


# ---------------------------------------------------------------------------------------------- templates


def chat_template(cfg: DataConfig) -> str:
    """The Jinja chat template to store on the tokenizer for export: the user's, or the built-in one
    (``auto`` is resolved against the tokenizer first, by ``resolve_template``)."""
    return BUILTIN_TEMPLATE if cfg.template in (None, AUTO_TEMPLATE) else read_template(cfg.template)


AUTO_TEMPLATE = "auto"


def resolve_template(cfg: DataConfig, tokenizer) -> DataConfig:
    """``cfg`` with ``template: auto`` made concrete: the tokenizer's own chat template (its text)
    when it has one, else None (the built-in), so the data, its cache key and the export agree."""
    if cfg.template != AUTO_TEMPLATE:
        return cfg
    own = getattr(tokenizer, "chat_template", None)  # the built-in's text (set on a demo tokenizer) is None
    return dataclasses.replace(cfg, template=own if isinstance(own, str) and own and own != BUILTIN_TEMPLATE else None)


@dataclasses.dataclass(frozen=True)
class Renderer:
    """Splits a conversation into (text, is_response) pieces under one template."""

    tokenizer: object
    template: str | None  # None: built-in template, rendered in Python (fast); else a Jinja string

    def pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """Prompt and response pieces up to the last assistant message (later messages teach nothing)."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if self.template is None:
            return self._builtin_pieces(messages[: last + 1])
        return self._jinja_pieces(messages[: last + 1])

    def generation_prompt(self, messages: list[dict]) -> str:
        """The text the model continues to answer after `messages` (the assistant header at the end)."""
        if self.template is None:
            body = _SEPARATOR.join(_HEADERS[m["role"]] + self._builtin_content(m) for m in messages)
            return body + (_SEPARATOR if messages else "") + _HEADERS["assistant"]
        return self._render(messages, add_generation_prompt=True)

    def _builtin_content(self, message: dict) -> str:
        content = message["content"].strip()
        return content + self.tokenizer.eos_token if message["role"] == "assistant" else content

    def _builtin_pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        pieces, prompt = [], []
        for i, message in enumerate(messages):
            prompt.append((_SEPARATOR if i else "") + _HEADERS[message["role"]])
            if message["role"] == "assistant":
                pieces.append(("".join(prompt), False))
                pieces.append((self._builtin_content(message), True))
                prompt = []
            else:
                prompt.append(self._builtin_content(message))
        return pieces

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError  # transformers renders templates with jinja2

        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except TemplateError as e:
            raise DataError(f"template: rendering {[m['role'] for m in messages]} fails: {e}") from e

    def _jinja_pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        pieces, done, full = [], "", ""  # done: rendered text already split into pieces
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:k], add_generation_prompt=True)
            full = self._render(messages[: k + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(
                    "template: rendering a conversation prefix does not extend the shorter prefix; the template "
                    "must render messages left to right so each generation prompt is a prefix of the next turn"
                )
            turn = full[len(prompt) :]
            # The response ends with its closing token; template text after it (e.g. a newline) is not a
            # target: it opens the next prompt piece. A special token splits BPE there, so the cut is token-safe.
            closed = len(turn_end_split(turn, self.tokenizer)[0])
            pieces += [(prompt[len(done) :], False), (turn[:closed], True)]
            done = prompt + turn[:closed]
        tail = full[len(done) :]  # after the last closing token: part of the row, never a target
        return pieces + [(tail, False)] if tail else pieces


def end_of_turn_tokens(tokenizer) -> list[str]:
    """Tokens that may close an assistant turn: the eos and the tokenizer's other special tokens
    (Llama 3's ``<|eot_id|>`` closes a turn while its base tokenizer's eos is ``<|end_of_text|>``)."""
    specials = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return list(dict.fromkeys([tokenizer.eos_token, *specials, *tokenizer.all_special_tokens]))


def turn_end_split(turn: str, tokenizer) -> tuple[str, str]:
    """(the response up to and including the token that closes it, that token): the eos or the special
    token that ends latest in the rendered assistant turn ``turn``. DataError when it has none."""
    ends = [(turn.rfind(t) + len(t), t) for t in end_of_turn_tokens(tokenizer) if t and t in turn]
    if not ends:
        raise DataError(
            f"template: an assistant turn renders as {turn!r}, which lacks the eos token {tokenizer.eos_token!r} "
            "or another special token to close it; the model must learn to stop, so end assistant turns with one"
        )
    end, token = max(ends, key=lambda e: (e[0], e[1] == tokenizer.eos_token))
    return turn[:end], token


def turn_end_token_id(tokenizer, template: str | None) -> int:
    """The id of the token that closes each assistant turn under ``template`` (None: the built-in,
    which closes with the eos). Generation must stop at it, so the model config lists it."""
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    response = [text for text, is_response in Renderer(tokenizer, template).pieces(probe) if is_response][-1]
    return tokenizer.convert_tokens_to_ids(turn_end_split(response, tokenizer)[1])


# ------------------------------------------------------------------------------------------- tokenization


@dataclasses.dataclass
class EncodedDocs:
    """Tokenized documents before the length policy: lists of python lists, one per example."""

    tokens: list[list[int]]
    supervised: list[list[bool]]  # token is a training target (response token or closing eos)
    response: list[list[bool]]  # token belongs to a response piece (for L_Q/L_A stats and truncation)
    last_response_start: list[int]  # index of the last response's first token


def encode_documents(
    conversations: list[list[dict]], renderer: Renderer, *, train_on_prompt: bool, last_turn_only: bool
) -> EncodedDocs:
    """Tokenize every piece of every conversation in one batched call and assemble documents."""
    all_pieces = [renderer.pieces(messages) for messages in conversations]
    texts = [text for pieces in all_pieces for text, _ in pieces]
    ids = []
    if texts:  # ids only: the attention masks and token type ids it would also build are never read
        ids = renderer.tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]
    out = EncodedDocs([], [], [], [])
    cursor = 0
    for pieces in all_pieces:
        tokens, supervised, response = [], [], []
        last = max(i for i, (_, is_response) in enumerate(pieces) if is_response)
        start = 0
        for i, (_, is_response) in enumerate(pieces):
            piece = ids[cursor + i]
            if i == last:
                start = len(tokens)
            learn = train_on_prompt or (is_response and (i == last or not last_turn_only))
            tokens += piece
            supervised += [learn] * len(piece)
            response += [is_response] * len(piece)
        cursor += len(pieces)
        out.tokens.append(tokens)
        out.supervised.append(supervised)
        out.response.append(response)
        out.last_response_start.append(start)
    return out


def check_prompt_tokens(conversations: list[list[dict]], docs: EncodedDocs, renderer: Renderer, n: int = 8):
    """Verify on a few examples that tokenizing the rendered prompt reproduces the training prompt tokens."""
    for messages, tokens, start in zip(conversations[:n], docs.tokens, docs.last_response_start):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = renderer.generation_prompt(messages[:last])
        expected = renderer.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if expected != tokens[:start]:
            raise DataError(
                "template: tokenizing the rendered generation prompt gives different tokens than the pieces used "
                f"in training (prompt {prompt[-80:]!r}); a piece boundary falls inside a BPE pre-token. End the "
                "generation prompt with a newline and start assistant content right after it"
            )


def encode_prompt(tokenizer, cfg: DataConfig, messages_or_example) -> list[int]:
    """Generation prompt tokens for an example (its last response is what the model must produce)."""
    messages = messages_of(messages_or_example, cfg.format)
    if any(m["role"] == "assistant" for m in messages):
        messages = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
    renderer = Renderer(tokenizer, None if cfg.template is None else chat_template(cfg))
    return tokenizer(renderer.generation_prompt(messages), add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids) -> str:
    """Exact text of `ids` (special tokens kept, no space clean-up)."""
    return tokenizer.backend_tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)
