"""What a fresh ``pip install sft_jax`` has is enough (issue 9 item 5): in a fresh process where
only the distributions in the closure of sft_jax's declared (non-extra) requirements can be
imported, as on a clean install, ``generate`` on an exported model and a training step with a
user ``data.template`` work, and every module they import belongs to that closure.

transformers imports jinja2 only inside ``apply_chat_template``, and jinja2 reached the test
environment only through torch (the test extra): without it declared, this test fails with
"apply_chat_template requires jinja2" while the rest of the suite passes."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_fixtures import CHAT_TEMPLATE, make_hf_model, save_hf_model, train_tokenizer
from train_fixtures import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
USER_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


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


SCRIPT = """
import importlib.metadata as md, json, sys
allowed = set(json.loads(sys.argv[1]))
norm = lambda n: n.replace("_", "-").replace(".", "-").lower()
before = set(sys.modules)
# a clean install: top-level modules of distributions outside the closure cannot be imported
for module, dists in md.packages_distributions().items():
    if module not in sys.stdlib_module_names and module != "sft_jax" and not any(norm(d) in allowed for d in dists):
        sys.modules.setdefault(module, None)
from sft_jax import generate, train
assert generate.main(["--model", "hf", "--prompt", "Hello world", "--max-new-tokens", "4"]) == 0
assert train.main(["--config", "tiny.yaml"]) == 0
imported = sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None} - {m.split(".")[0] for m in before})
print("MODULES " + json.dumps(imported))
"""


def test_generate_and_a_user_template_step_need_only_declared_dependencies(tmp_path):
    from sft_jax.config import load_config

    allowed = declared_closure()
    directory = save_hf_model(make_hf_model(seed=0), tmp_path / "hf")
    tokenizer = train_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    cfg = load_config(None, TINY_OVERRIDES + ["run.output_dir=run", "train.steps=1", "train.compilation_cache=null",
                                              "checkpoint.async_save=false", f"data.template={json.dumps(USER_TEMPLATE)}"])
    (tmp_path / "tiny.yaml").write_text(cfg.to_yaml())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS="", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), json.dumps(sorted(allowed))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [l for l in done.stdout.splitlines() if l.startswith("MODULES ")]
    owners = md.packages_distributions()
    outside = {m: owners[m] for m in json.loads(line[8:])
               if m in owners and m != "sft_jax" and not any(_norm(d) in allowed for d in owners[m])}
    assert not outside, f"imported from undeclared distributions: {outside}"
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
