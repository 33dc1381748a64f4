"""The commands as a user types them: relative and ~ paths from a working directory, the
"no --config" rule, overrides on both sides of --config, one-line user errors with exit 2, and
the chat template the run trained with carried by every checkpoint (issue 9 item 4, issue 13).

And what a fresh ``pip install sft_jax`` has is enough (issue 9 item 5): in a fresh process
where only the distributions in the closure of sft_jax's declared (non-extra) requirements can
be imported, as on a clean install, ``generate`` on an exported model and a training step with
a user ``data.template`` work, and every module they import belongs to that closure.
transformers imports jinja2 only inside ``apply_chat_template``, and jinja2 reached the test
environment only through torch (the test extra): with jinja2 not declared, this fails with
"apply_chat_template requires jinja2" while the rest of the suite passes."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from data_fixtures import write_jsonl
from hf_fixtures import make_hf_model, save_hf_model, train_tokenizer
from sft_jax import chat, cli, convert, generate, train
from sft_jax.models import hf_io as hf
from sft_jax.core import checkpoint
from sft_jax.data import BUILTIN_TEMPLATE
from sft_jax.data.__main__ import main as data_main
from sft_jax.inference.sampling import generate as reference_generate
from train_fixtures import REPO, write_tiny_yaml

USER_TEMPLATE = (  # a user data.template (the same shape as test_data_formats'), different from the built-in
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."} for i in range(40)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's directory: an HF model whose tokenizer has no chat template (like stock GPT-2),
    a data file, and run YAMLs that name them by relative paths; run.yaml trained there with
    ``python -m sft_jax.train --config run.yaml`` (in process, 8 devices) from that directory."""
    root = tmp_path_factory.mktemp("user")
    save_hf_model(make_hf_model(seed=0), root / "hf_in")
    tokenizer = train_tokenizer()
    assert not tokenizer.chat_template
    tokenizer.save_pretrained(root / "hf_in")
    write_jsonl(root / "train.jsonl", ROWS)
    overrides = ["model.init_from=hf_in", "data.train=train.jsonl", "data.format=alpaca", "data.eval_fraction=0",
                 "train.steps=2", "mesh.shape=[2,2,2]"]
    write_tiny_yaml(root / "run.yaml", "runs/r", *overrides, "run.export=true")
    write_tiny_yaml(root / "user_template.yaml", "runs/u", *overrides, "train.steps=1", "mesh.shape=[-1,1,1]",
                    "checkpoint.async_save=false", f"data.template={json.dumps(USER_TEMPLATE)}")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert train.main(["--config", "run.yaml"]) == 0
    finally:
        os.chdir(cwd)
    (root / "train_stdout.txt").write_text(out.getvalue())
    assert checkpoint.latest_step(root / "runs/r/checkpoints") == 2 and (root / "runs/r/hf").is_dir()
    return root


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_closure() -> set[str]:
    """Normalised names of sft_jax's [project].dependencies (read from this checkout's
    pyproject.toml, not the possibly stale installed metadata) and, transitively, of their own
    requirements as installed (markers evaluated, no extras except those a requirement names)."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    todo = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen:
            continue
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue  # not installed here (e.g. a platform-specific requirement)
        seen.add(name)
        for text in requires:
            sub = Requirement(text)
            envs = [{"extra": e} for e in (req.extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return seen


FRESH_INSTALL = """
import importlib.metadata as md, json, re, sys
allowed = set(json.loads(sys.argv[1]))
before = set(sys.modules)
# a clean install: top-level modules of distributions outside the closure cannot be imported
for module, dists in md.packages_distributions().items():
    if module not in sys.stdlib_module_names and module != "sft_jax" and \
            not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists):
        sys.modules.setdefault(module, None)
from sft_jax import generate, train
assert generate.main(["--model", "runs/r/hf", "--prompt", "Add 1 and 2.", "--max-new-tokens", "4"]) == 0
assert train.main(["--config", "user_template.yaml"]) == 0
imported = {m.split(".")[0] for m, v in sys.modules.items() if v is not None} - {m.split(".")[0] for m in before}
print("MODULES " + json.dumps(sorted(imported)))
"""


@pytest.fixture(scope="module")
def fresh_install(workdir):
    """``generate`` on run r's export and ``train --config user_template.yaml`` (one step, one
    device) in a fresh process that can import only the declared closure; its imported modules."""
    allowed = declared_closure()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f),
               HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(FRESH_INSTALL), json.dumps(sorted(allowed))],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [l for l in done.stdout.splitlines() if l.startswith("MODULES ")]
    return allowed, json.loads(line[len("MODULES "):]), done.stderr


def test_generate_and_a_user_template_step_need_only_declared_dependencies(workdir, fresh_install):
    allowed, imported, _ = fresh_install
    owners = md.packages_distributions()
    outside = {m: owners[m] for m in imported
               if m in owners and m != "sft_jax" and not any(_norm(d) in allowed for d in owners[m])}
    assert not outside, f"imported from undeclared distributions: {outside}"
    assert "jinja2" in imported and checkpoint.latest_step(workdir / "runs/u/checkpoints") == 1


def test_a_torch_free_start_says_nothing_about_torch_or_orbax_handlers(fresh_install):
    """Without torch (not a declared dependency), ``generate`` and a training step print neither
    transformers' "PyTorch was not found" notice (only its tokenizers are used) nor orbax's
    warning about the array handler the checkpoints replace on purpose."""
    allowed, imported, stderr = fresh_install
    assert "torch" not in allowed and "torch" not in imported
    assert "PyTorch was not found" not in stderr, stderr[:2000]
    assert "overriding jax.Array" not in stderr and "Type handler registry" not in stderr, stderr[:2000]


def _reference_reply(root, template: str, prompt: str, max_new: int) -> str:
    """Greedy reply of the checkpoint's weights to ``prompt`` rendered by ``template`` (by hand)."""
    tokenizer = hf.load_tokenizer(root / "hf_in")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                         add_generation_prompt=True, tokenize=False)
    restored = checkpoint.restore(root / "runs/r/checkpoints" if template is BUILTIN_TEMPLATE
                                  else root / "runs/u/checkpoints")
    ids = tokenizer.encode(text, add_special_tokens=False)
    (out,) = reference_generate(restored["params"], restored["model_config"], [ids], max_new_tokens=max_new,
                                eos_id=tokenizer.eos_token_id)
    return tokenizer.decode([t for t in out if t != tokenizer.eos_token_id], skip_special_tokens=True)


def test_documented_commands_take_relative_and_home_paths(workdir, monkeypatch, capsys):
    """README: ``convert orbax-to-hf runs/demo/checkpoints runs/demo/hf_copy``, ``generate --model
    runs/demo/checkpoints``, ``chat --model ...``, ``data --config ...``, ``convert hf-to-orbax``."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HOME", str(workdir))
    assert data_main(["--config", "run.yaml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["kept"] == len(ROWS)
    assert convert.main(["orbax-to-hf", "runs/r/checkpoints", "runs/r/hf_copy"]) == 0
    assert convert.main(["hf-to-orbax", "./hf_in", "~/ckpt0"]) == 0
    assert checkpoint.latest_step(workdir / "ckpt0") == 0
    capsys.readouterr()
    printed = []
    for model in ("runs/r/checkpoints", "~/runs/r/checkpoints/2", "runs/r/hf_copy"):
        assert generate.main(["--model", model, "--prompt", "Add 1 and 2.", "--max-new-tokens", "4"]) == 0, model
        printed.append(capsys.readouterr().out)
    assert len(set(printed)) == 1, printed  # checkpoint, step dir and export agree
    monkeypatch.setattr(sys, "stdin", io.StringIO("Add 1 and 2.\n"))
    assert chat.main(["--model", "runs/r/checkpoints", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == printed[0][:-1].replace("\n", " ") + "\n"


@pytest.mark.parametrize("run, template", [("r", BUILTIN_TEMPLATE), ("u", USER_TEMPLATE)])
def test_checkpoint_carries_the_template_the_run_trained_with(workdir, run, template, tmp_path, capsys, request):
    """From a tokenizer without a template: the checkpoint, its conversion and ``generate`` on it
    all use the run's template (built-in, or the user's data.template), not the tokenizer's none."""
    if run == "u":
        request.getfixturevalue("fresh_install")  # trains run u
    ckpt = workdir / "runs" / run / "checkpoints"
    assert checkpoint.restore(ckpt)["tokenizer"].chat_template == template
    assert convert.main(["orbax-to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert hf.load_tokenizer(tmp_path / "hf").chat_template == template
    capsys.readouterr()
    assert generate.main(["--model", str(ckpt), "--prompt", "Add 3 and 4.", "--max-new-tokens", "6"]) == 0
    want = _reference_reply(workdir, template, "Add 3 and 4.", 6)
    assert capsys.readouterr().out == want + "\n"


def test_closing_lines_give_every_path_as_the_output_dir_was_given(workdir):
    """run.output_dir=runs/r from the user's directory: the checkpoints, the report and the export
    are printed in that one relative form, ready to paste into the next command there."""
    lines = (workdir / "train_stdout.txt").read_text().strip().splitlines()[-4:]
    assert lines == ["checkpoints: runs/r/checkpoints", "report:      runs/r/report.md", "HF export:   runs/r/hf",
                     "chat with it: python -m sft_jax.chat --model runs/r/hf"]


def test_no_config_rule(tmp_path, capsys):
    """Without --config, overrides apply to the demo unless they name a model or data (exit 2, one line)."""
    for overrides in (["model.init_from=gpt2"], ["data.train=my.jsonl", "train.steps=5"], ["data.eval=x.jsonl"]):
        assert train.main([f"run.output_dir={tmp_path / 'run'}", *overrides]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "without --config" in err[0] and "--config gpt2_alpaca" in err[0], err
        assert data_main(overrides) == 2
        assert "without --config" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert cli.load_config(None, ["train.steps=5"]).optim.lr == 3e-3  # the demo, overridden
    assert cli.load_config("gpt2_alpaca", ["data.train=my.jsonl"]).data.train == "my.jsonl"


def test_overrides_on_both_sides_of_config(tmp_path, capsys):
    """``train train.steps=10 --config demo model.preset=tiny`` parses (parse_intermixed_args);
    a bad value on the right side is then a one-line error, exit 2."""
    args = ["train.steps=10", "--config", "demo", "model.preset=nope", f"run.output_dir={tmp_path / 'run'}"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "model.preset='nope'" in err[0], err
    assert data_main(["data.max_length=32", "--json", "--config", "demo", "train.seed=1"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["kept"] > 0


@pytest.mark.parametrize("command, args, says", [
    (generate.main, ["--model", "./no_such_dir", "--prompt", "hi"], "no such model directory"),
    (chat.main, ["--model", "./no_such_dir"], "no such model directory"),
    (convert.main, ["orbax-to-hf", "no_such_ckpt", "out"], "not an sft_jax orbax checkpoint"),
    (data_main, ["--config", "demo", "data.train=missing.jsonl", "data.format=alpaca"], "missing.jsonl"),
])
def test_user_errors_are_one_line_exit_2(command, args, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert command(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_bench_flags_are_user_errors(capsys):
    from sft_jax import bench

    assert bench.main(["--preset", "gpt5", "--no-torch"]) == 2
    assert bench.main(["--preset", "tiny", "--seq", "4096", "--steps", "1", "--warmup", "0", "--no-torch"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "choose one of" in err[0] and "exceeds n_positions" in err[1], err


def test_resolve_path_keeps_hub_names_and_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert cli.resolve_path("gpt2") == "gpt2" and cli.resolve_path("openai-community/gpt2") == "openai-community/gpt2"
    assert cli.resolve_path("gs://b/run") == "gs://b/run"
    assert cli.resolve_path("local") == str(tmp_path / "local")
    assert cli.resolve_path("out", must_be_local=True) == str(tmp_path / "out")
