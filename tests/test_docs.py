"""The README and docs/ as a user meets them: the README is short and starts with the two
commands CI runs, every command they show answers ``--help``, the configuration reference is
what the code generates, ``--help-config`` covers every section, and no page talks about how
the project was made."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sft_jax import configref, train
from sft_jax.config import Config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
FIRST_COMMANDS = ["pip install -e . && python -m sft_jax.train", "pip install -e '.[test]' && python -m pytest -q"]
CONFIG_COMMANDS = ("sft_jax.train", "sft_jax.data", "sft_jax.reward", "sft_jax.dpo", "sft_jax.ppo")


def code_blocks(text: str) -> list[str]:
    return [m.group(1).strip("\n") for m in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)]


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 220, f"README.md has {len(text.splitlines())} lines; at most 220"
    assert code_blocks(text)[:2] == FIRST_COMMANDS
    # CI runs the second one exactly as the README writes it
    assert FIRST_COMMANDS[1] in (REPO / ".ci" / "run").read_text().splitlines()
    # its links to the pages resolve (mkdocs checks the pages' own links)
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"


def test_no_page_speaks_of_how_the_project_was_made():
    for page in [README, *PAGES]:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            assert not re.search(r"issue|session", line, re.I), f"{page.relative_to(REPO)}:{n}: {line}"


def shown_commands() -> list[list[str]]:
    """Each distinct ``python -m sft_jax.X [subcommand]`` in the README's and the pages' code,
    as argv for ``--help``: the commands that read the config first."""
    seen = {}
    for page in [README, *PAGES]:
        for m in re.finditer(r"python -m (sft_jax(?:\.\w+)*)(?: ([a-z][a-z-]*)(?=\s|$))?", page.read_text()):
            module, sub = m.group(1), m.group(2)
            seen.setdefault(module, set())
            if sub:
                seen[module].add(sub)
    ordered = sorted(seen, key=lambda m: (m not in CONFIG_COMMANDS, m))
    return [[m] for m in ordered] + [[m, s] for m in ordered for s in sorted(seen[m])]


HELP_SCRIPT = r"""
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore", RuntimeWarning)  # runpy, on a module an earlier command imported
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = [argv[0], *argv[1:], "--help"]
    out = io.StringIO()
    code = None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    results.append({"argv": argv, "code": code, "jax": "jax" in sys.modules, "help": out.getvalue()})
print(json.dumps(results))
"""


def test_every_command_shown_answers_help():
    commands = shown_commands()
    modules = {c[0] for c in commands}
    assert {"sft_jax.train", "sft_jax.data", "sft_jax.reward", "sft_jax.dpo", "sft_jax.ppo", "sft_jax.generate",
            "sft_jax.chat", "sft_jax.convert", "sft_jax.analyze", "sft_jax.plan", "sft_jax.bench"} <= modules
    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT, json.dumps(commands)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    for r in results:
        name = "python -m " + " ".join(r["argv"]) + " --help"
        assert r["code"] in (0, None), f"{name} exited {r['code']}"
        assert "usage:" in r["help"], name
        if r["argv"] in ([m] for m in CONFIG_COMMANDS):
            # the epilog names the sections from config.py's source; --help loads no config, no jax
            assert "config sections: model, data, train" in r["help"], name
            assert "docs/configuration.md" in r["help"] and "--help-config" in r["help"], name
            assert not r["jax"], f"{name} imported jax"


def test_configuration_page_is_what_the_code_generates():
    proc = subprocess.run([sys.executable, "-m", "sft_jax.config", "--markdown"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == proc.stdout, f"docs/configuration.md is out of date; regenerate it: {configref.REGENERATE}"


def leaf_keys(tree, where: str) -> list[str]:
    """Every dotted key of a config (sub)tree whose value is not itself a section."""
    keys = []
    for f in dataclasses.fields(tree):
        value, name = getattr(tree, f.name), f"{where}.{f.name}".lstrip(".")
        keys += leaf_keys(value, name) if dataclasses.is_dataclass(value) else [name]
    return keys


def test_every_key_is_in_the_reference_with_a_comment():
    keys = {k.name: k for s in configref.sections() for k in s.keys}
    assert sorted(keys) == sorted(leaf_keys(Config(), ""))
    assert [k for k in keys.values() if not k.comment] == [], "every config field needs a comment in the code"
    assert configref.section_names() == [f.name for f in dataclasses.fields(Config)]


def test_help_config_prints_every_section(capsys):
    for section in configref.section_names():
        with pytest.raises(SystemExit) as exit_:
            train.main(["--help-config", section])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        for key in leaf_keys(getattr(Config(), section), section):
            assert f"\n  {key}: " in out, key
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help-config", "model.init_from"])
    assert exit_.value.code == 0 and capsys.readouterr().out.count("\n  model.") == 1


def test_help_config_refuses_an_unknown_section_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help-config", "modle"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config section 'modle'; sections: model, data,") and err.count("\n") == 1


@dataclasses.dataclass(frozen=True)
class _Commented:
    a: int = 1  # a's own
    # b's block
    b: int = 2
    c: int = 3
    d: str = "#"  # d's own,
    # continued
    e: int = 4  # e's own
    # g's block
    g: int = 7

    f: int = 5
    h: int = 8


def test_comments_are_attached_as_the_source_reads():
    assert configref.field_comments(_Commented) == {
        "a": "a's own", "b": "b's block", "c": "b's block", "d": "d's own, continued", "e": "e's own",
        "g": "g's block", "f": "", "h": ""}
