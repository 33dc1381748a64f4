"""The configuration reference: every key of ``sft_jax.config.Config`` with its type, its default
and the comment its source gives it, as Markdown (``docs/configuration.md``) or as terminal text.

    python -m sft_jax.config --markdown > docs/configuration.md
    python -m sft_jax.train --help-config [SECTION]

Nothing is written twice: types and defaults come from the dataclasses, meanings from the
comments beside (or directly above) each field in the source. How a comment is attached:

- ``name: T = x  # text``: the trailing comment is the field's;
- comment lines directly above a field are its comment, and also the comment of the fields
  right after it that have none of their own (``reward_fn`` and ``reward_model`` share one);
- comment lines between a field with a trailing comment and another such field continue the
  first one's comment.

Sections (``Config``'s fields) and nested sections (a field whose type is a dataclass) are
walked recursively, so ``data.*`` and any sub-section appear with their dotted keys.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

REGENERATE = "python -m sft_jax.config --markdown > docs/configuration.md"
PAGE = "docs/configuration.md"


@dataclasses.dataclass(frozen=True)
class Key:
    name: str  # dotted, as an override writes it: train.steps
    type: str  # as YAML spells it: int, str | null, list[int]
    default: str  # YAML flow (JSON): 0, "auto", null, [-1, 1, 1]
    comment: str


@dataclasses.dataclass(frozen=True)
class Section:
    name: str  # dotted: model, data, data.cache (a nested section)
    summary: str  # the comment on the field that holds the section
    doc: str  # the section class's docstring, if it has one
    keys: tuple[Key, ...]


# --- reading the source ----------------------------------------------------------------

def section_names() -> list[str]:
    """The top-level sections, read from ``config.py``'s source without importing it (it imports
    jax), so that a command's ``--help`` stays fast."""
    source = Path(importlib.util.find_spec("sft_jax.config").origin).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == "Config":
            return [n.target.id for n in node.body if isinstance(n, ast.AnnAssign)]
    raise LookupError("sft_jax/config.py defines no class Config")


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` for a dataclass, from its source (rules in the module docstring)."""
    source = textwrap.dedent(inspect.getsource(cls))
    (node,) = ast.parse(source).body
    fields = [(n.target.id, n.lineno, n.end_lineno) for n in node.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    lines = source.splitlines()
    trailing: dict[int, str] = {}  # line -> a comment after code on that line
    alone: dict[int, str] = {}  # line -> a comment that is the whole line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            (alone if not lines[row - 1][:col].strip() else trailing)[row] = text

    comments: dict[str, str] = {}
    previous = None  # (name, end line, had a trailing comment) of the field before
    shared = None  # a block above the previous field, which the next bare field inherits
    for name, first, last in fields:
        own = " ".join(trailing[r] for r in range(first, last + 1) if r in trailing)
        block, row = [], first - 1
        while row in alone:
            block.insert(0, alone[row])
            row -= 1
        follows = previous is not None and previous[1] == row  # the block (or field) sits right after it
        if block and own and follows and previous[2]:
            comments[previous[0]] = f"{comments[previous[0]]} {' '.join(block)}"  # a continuation
            block = []
        if block:
            shared = " ".join(block)
            comments[name] = f"{shared} {own}".strip()
        elif own:
            shared = None
            comments[name] = own
        else:
            shared = shared if follows else None
            comments[name] = shared or ""
        previous = (name, last, bool(own))
    return comments


def _class_doc(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclass writes when there is no docstring
        return ""
    return " ".join(doc.replace("``", "`").split())


def _about(section: Section) -> str:
    """The section's comment in Config, then its docstring, unless the docstring starts by saying it."""
    def letters(s):
        return re.sub(r"[^a-z0-9]", "", s.lower())

    if section.doc and letters(section.doc).startswith(letters(section.summary)):
        return section.doc
    return " ".join(p for p in (_sentence(section.summary), section.doc) if p)


def _type_name(t) -> str:
    """A type as a YAML user reads it: ``str | null``, ``list[int]``."""
    if t is type(None):
        return "null"
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        return " | ".join(_type_name(a) for a in sorted(args, key=lambda a: a is type(None)))
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(t))
    if origin in (tuple, list) or t in (tuple, list):
        inner = [a for a in typing.get_args(t) if a is not Ellipsis]
        return f"list[{_type_name(inner[0])}]" if inner else "list"
    return getattr(t, "__name__", str(t))


def _default(value) -> str:
    plain = list(value) if isinstance(value, tuple) else value
    return json.dumps(plain)


def sections(config_cls=None) -> list[Section]:
    """Every section of the config tree, depth first: ``model``, ``data``, ... and their nested ones."""
    if config_cls is None:
        from sft_jax.config import Config as config_cls
    out: list[Section] = []
    summaries = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        _walk(typing.get_type_hints(config_cls)[f.name], f.name, summaries.get(f.name, ""), out)
    return out


def _walk(cls, where: str, summary: str, out: list[Section]) -> None:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    instance = cls()
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            nested.append((t, f"{where}.{f.name}", comments.get(f.name, "")))
        else:
            keys.append(Key(f"{where}.{f.name}", _type_name(t), _default(getattr(instance, f.name)),
                            comments.get(f.name, "")))
    out.append(Section(where, summary, _class_doc(cls), tuple(keys)))
    for t, name, text in nested:
        _walk(t, name, text, out)


# --- writing it ------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(config_cls=None) -> str:
    """The whole reference page (``docs/configuration.md``)."""
    secs = sections(config_cls)
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the code by `{REGENERATE}`; edit the comments in the code, not this page. -->",
        "",
        "`train`, `reward`, `dpo`, `ppo` and `data` read one typed configuration tree. Its values come from, "
        "later winning: the defaults below, the YAML file given with `--config` (a path, or the name of a "
        "shipped config such as `gpt2_alpaca`), then `SECTION.KEY=VALUE` overrides on the command line, "
        "whose values are read as YAML (`5` is an int, `1e-4` a float, `[2, 2, 2]` a list, `null` nothing). "
        "An unknown key or a value of the wrong type stops the command with one line naming the valid keys. "
        "The resolved tree is written to `run.output_dir/config.yaml`.",
        "",
        "The same reference in a terminal: `python -m sft_jax.train --help-config [SECTION]`. "
        "Types are as YAML writes them. A default is the value a key takes when neither the config "
        "file nor an override sets it; a command run without `--config` reads its demo config, which sets some.",
        "",
        "Sections: " + " · ".join(f"[{s.name}](#{s.name.replace('.', '')})" for s in secs),
        "",
    ]
    for s in secs:
        out += [f"## {s.name}", ""]
        text = _about(s)
        if text:
            out += [text, ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| `{k.name}` | {_cell(k.type)} | `{_cell(k.default)}` | {_cell(k.comment)} |" for k in s.keys]
        out.append("")
    return "\n".join(out)


def _sentence(text: str) -> str:
    text = text.strip()
    return f"{text[:1].upper()}{text[1:]}." if text and not text.endswith(".") else text


def text(prefix: str = "", width: int = 100, config_cls=None) -> str:
    """The keys under ``prefix`` (a section, a nested section or one key; "" = all) for a terminal.
    Raises KeyError when nothing matches."""
    chunks = []
    for s in sections(config_cls):
        keys = [k for k in s.keys if not prefix or k.name == prefix or k.name.startswith(prefix + ".")]
        if not keys:
            continue
        head = _about(s)
        lines = [f"[{s.name}]" + (f"  {head}" if head else "")]
        lines = textwrap.wrap(lines[0], width, subsequent_indent="    ")
        for k in keys:
            lines.append(f"  {k.name}: {k.type} = {k.default}")
            if k.comment:
                lines += textwrap.wrap(k.comment, width, initial_indent="      ", subsequent_indent="      ")
        chunks.append("\n".join(lines))
    if not chunks:
        raise KeyError(prefix)
    return "\n\n".join(chunks)


def epilog() -> str:
    """The paragraph every config-reading command's ``--help`` ends with."""
    return (f"config sections: {', '.join(section_names())}. Override any key as SECTION.KEY=VALUE. "
            f"--help-config [SECTION] prints every key of the config (or of one section) with its type, default "
            f"and meaning; the same reference is {PAGE}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.config",
                                     description="The configuration reference, generated from the code.")
    parser.add_argument("--markdown", action="store_true", help=f"print {PAGE} (regenerate it: {REGENERATE})")
    parser.add_argument("section", nargs="?", default="", help="only this section (terminal text)")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    try:
        print(text(args.section))
    except KeyError:  # the commands' user-error form (sft_jax.cli), without importing the commands
        print(f"error: unknown config section {args.section!r}; sections: {', '.join(section_names())}",
              file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
