"""The layout is the architecture: layers, no import cycles, module sizes, one client API."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from lmcache_mesh.node import AsyncClient, Client

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["engines", "node", "mesh", "transports"]
"""Top to bottom: a package may import only itself and the packages below it."""

MAX_MODULE_LINES = 600
MAX_NODE_SHARE = 0.35


def _modules() -> dict[str, Path]:
    """Every source module, by its import name (``lmcache_mesh.node.client``)."""
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(["lmcache_mesh", *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules ``name`` imports anywhere in its file: top level, ``TYPE_CHECKING`` and
    function-local imports alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pkg import mod`` imports the module; ``from mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_imports_only_go_down_the_layers() -> None:
    """engines -> node -> mesh -> transports: never up, never sideways into a higher layer."""
    wrong = [
        f"{m} imports {t}"
        for m, targets in _graph().items()
        for t in targets
        if LAYERS.index(_layer(t)) < LAYERS.index(_layer(m))
    ]
    assert wrong == []


def test_the_import_graph_has_no_cycle() -> None:
    """No module reaches itself through imports (TYPE_CHECKING and local imports included)."""
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append([*path[path.index(t) :], t])
            elif state.get(t) is None:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_module_is_too_long_and_node_holds_at_most_its_share() -> None:
    """Modules stay under 600 lines; node/ holds at most 35% of the source lines."""
    lines = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {n: c for n, c in lines.items() if c > MAX_MODULE_LINES} == {}
    node = sum(c for n, c in lines.items() if _layer(n) == "node")
    assert node / sum(lines.values()) <= MAX_NODE_SHARE


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in ("close", "aclose")
    }


def test_client_and_async_client_have_the_same_methods_and_signatures() -> None:
    """One API, two ways of waiting: the methods and their parameters match one for one."""
    sync, asynchronous = _public(Client), _public(AsyncClient)
    assert sorted(sync) == sorted(asynchronous)
    for name, signature in sync.items():
        assert list(signature.parameters) == list(asynchronous[name].parameters), name
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name


def test_node_commands_import_no_engine_and_no_demo() -> None:
    """Building the CLI parser (what ``status`` does first) pulls in no engine, demo or chart."""
    import subprocess
    import sys

    probe = (
        "import sys; from lmcache_mesh.engines.cli import build_parser; build_parser(); "
        "bad = [m for m in sys.modules if m.startswith(('lmcache_mesh.engines.llamacpp', "
        "'lmcache_mesh.engines.vllm', 'lmcache_mesh.engines.cli.demo.', 'llama_cpp', 'vllm', 'torch', "
        "'matplotlib')) or m == 'lmcache_mesh.engines.cli.demo']; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
