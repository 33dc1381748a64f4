"""The package reads top-down: commands, then objectives, analysis and adapters, then the core,
data and models, with process plumbing (runtime) at the bottom. Imports are read from the
source (function-level ones too, ``if __name__ == "__main__"`` blocks aside), so a lazy import
that points back up is caught as well as a module-level one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sft_jax"
COMMANDS = {"train", "reward", "dpo", "ppo", "generate", "chat", "convert", "analyze", "plan", "bench", "cli",
            "data.__main__"}
# layer -> the layers it must not import (lower layers never reach up)
FORBIDDEN = {
    "core": {"objectives", "analysis", "demos", "commands"},
    "data": {"core", "objectives", "analysis", "demos", "commands", "inference", "adapters"},
    "models": {"core", "data", "objectives", "analysis", "demos", "commands", "inference", "adapters"},
    "runtime": {"core", "data", "models", "objectives", "analysis", "demos", "commands", "inference", "adapters"},
    "inference": {"core", "objectives", "analysis", "demos", "commands"},
    "objectives": {"analysis", "commands"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict) -> set[str]:
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    found = set()

    def resolve(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sft_jax"):
            for alias in node.names:
                target = resolve(f"{node.module}.{alias.name}")
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("sft_jax")}
    return found - {None}


def _layer(module: str) -> str:
    rest = module.removeprefix("sft_jax.")
    if rest in COMMANDS:
        return "commands"
    return rest.split(".")[0]


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, path: list[str]):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_lower_layers_never_import_upper_ones():
    modules = _modules()
    wrong = []
    for m, p in sorted(modules.items()):
        banned = FORBIDDEN.get(_layer(m), set())
        wrong += [f"{m} imports {t}" for t in sorted(_imports(p, modules)) if _layer(t) in banned]
    assert not wrong, wrong
