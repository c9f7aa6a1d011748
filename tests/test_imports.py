"""The import rules (architecture.md): light faces stay light, and engine.ml needs torch alone.

The layers (faces over engine over store; the store imports no engine, faces, torch or textual)
are import-linter contracts in pyproject.toml, checked by ``make lint``. Here are the rules about
what an import loads and when:

- loading ``store`` loads neither torch nor textual; ``import mesa_tui.cli`` loads neither (fast
  --help); ``engine.specs``, ``engine.catalog`` and ``engine.reporter`` do not load torch.
- outside ``engine.ml`` and ``engine.tasks`` torch is only imported lazily inside functions.
- ``engine.ml`` imports only the standard library, torch, numpy, safetensors, PIL, matplotlib,
  torchvision (``data.py`` only), a few engine modules and ``store.environment`` (the standard
  library only), so GPU benchmarks run with torch alone.

The modules are scanned as they are at test time, so modules added later are checked too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "textual")


def _modules(package: str) -> list[str]:
    base = ROOT / package
    out = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _loaded_after_import(modules: list[str]) -> set[str]:
    """Import ``modules`` in a fresh interpreter; return the top-level packages it loaded."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_store_loads_neither_torch_nor_textual():
    # Alembic's migration scripts run only inside alembic; the import-linter contract covers them.
    modules = [m for m in _modules("store") if ".migrations" not in m]
    if not modules:
        pytest.skip("the store package has no modules yet")
    assert not _loaded_after_import(modules) & set(HEAVY)


def test_cli_entry_loads_neither_torch_nor_textual():
    assert not _loaded_after_import(["mesa_tui.cli"]) & set(HEAVY)


def test_specs_catalog_reporter_do_not_load_torch():
    loaded = _loaded_after_import(["engine.specs", "engine.catalog", "engine.reporter"])
    assert "torch" not in loaded


# ---------------------------------------------------------------------------------------------
# Static scan of import statements


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    # Imports under `if TYPE_CHECKING:` or try/except at the top still run at import time.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "__future__":
                continue
            found.append((name, node.lineno, id(node) in top_level))
    return found


def _scan(package: str):
    for module in _modules(package):
        path = ROOT / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for name, line, top in _imports(path, module):
            yield module, path.relative_to(ROOT), name, line, top


def _is(name: str, *roots: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def test_torch_only_lazily_outside_engine_ml_and_tasks():
    bad = [
        f"{p}:{line} imports {n} at module level"
        for module, p, n, line, top in _scan("engine")
        if top
        and _is(n, "torch", "torchvision", "engine.ml", "engine.tasks")
        and not _is(module, "engine.ml", "engine.tasks")
    ]
    assert not bad, bad


ML_ALLOWED_THIRD_PARTY = ("torch", "numpy", "safetensors", "PIL", "matplotlib")
ML_ALLOWED_ENGINE = tuple(
    f"engine.{m}"
    for m in (
        "ml",
        "errors",
        "reporter",
        "triggerspec",
        "catalog",
        "paths",
        "version",
        "run_environment",
    )
)


def test_engine_ml_imports_only_torch_numpy_safetensors_and_stdlib():
    bad = []
    for module, p, name, line, _ in _scan("engine/ml"):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or _is(name, *ML_ALLOWED_THIRD_PARTY):
            continue
        if _is(name, *ML_ALLOWED_ENGINE) or name == "engine":
            continue
        if name == "store.environment":  # the standard library only
            continue
        if _is(name, "torchvision") and module == "engine.ml.data":
            continue
        bad.append(f"{p}:{line} imports {name}")
    assert not bad, bad


def test_the_scan_sees_imports():
    """Guard against a scan that silently finds nothing."""
    found = {n for module, _, n, _, _ in _scan("engine/ml") if module == "engine.ml.data"}
    assert {"torch", "numpy", "engine.catalog", "torchvision.datasets"} <= found
    assert _modules("engine/ml") and "engine.ml.triggers" in _modules("engine/ml")


def test_optional_extras_are_imported_lazily():
    """``ray``, ``psycopg`` and ``tensorboard`` (extras) load only inside the functions that need
    them, so every module imports without them."""
    bad = [
        f"{p}:{line} imports {n} at module level"
        for package in ("engine", "store", "mesa_tui")
        for _, p, n, line, top in _scan(package)
        if top and _is(n, "ray", "psycopg", "psycopg2", "tensorboard")
    ]
    assert not bad, bad


def test_commands_other_than_run_and_submit_do_not_load_the_specs():
    """The spec options are made when such a command runs (``model_options``), not when typer
    builds the command tree for every invocation."""
    code = (
        "import sys, typer\n"
        "from mesa_tui.cli import app\n"
        "typer.main.get_command(app)\n"
        "print('engine.specs' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"
