"""Dependencies point one way: entrypoints -> serve/distributed -> engine -> models -> layers -> config, checkpoint,
tokenizer -> base modules.

Every import statement of every module counts, the ones inside functions too (read from the AST), so a cycle
cannot hide behind a lazy import. Each package is also imported in a fresh interpreter: importing it must work on
its own and must not load a package above it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import s1serve

ROOT = Path(s1serve.__file__).parent

# The units of the layering: a top-level module or a package of s1serve, and what each may import from s1serve.
BASE = {"errors", "assets", "config", "parallel", "sampling_params", "constraints"}
LOW = BASE | {"checkpoint", "tokenizer"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "assets": set(),
    "config": {"errors"},
    "parallel": {"errors"},
    "constraints": {"errors"},
    "sampling_params": {"errors", "config", "constraints"},
    "checkpoint": {"errors", "assets", "config"},
    "tokenizer": {"errors", "assets", "config"},
    # Media decoding and prompt expansion: beside the tokenizer, below the engine (which only sees features).
    "multimodal": LOW,
    "layers": LOW,
    "models": LOW | {"layers"},
    "engine": LOW | {"layers", "models"},
    "distributed": LOW | {"layers", "models", "engine"},
    "serve": LOW | {"layers", "models", "engine", "multimodal"},
    "entrypoints": LOW | {"layers", "models", "engine", "distributed", "serve", "multimodal"},
}
# Front doors above every layer: the package's lazy `LLM` re-export, `python -m s1serve`, the CLI shim and
# `python -m s1serve.launch_server` (SGLang's command line).
FRONT = {"__init__", "__main__", "cli", "launch_server"}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "s1serve":  # `from s1serve import x`: x is a submodule or a package attribute
                found += [(node.lineno, f"s1serve.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, module) for line, module in found if module == "s1serve" or module.startswith("s1serve.")]


def layer_violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        source = unit_of(module_name(path)) if module_name(path) != "s1serve" else "__init__"
        if source in FRONT:
            continue
        assert source in ALLOWED, f"{path}: {source!r} belongs to no layer; add it to ALLOWED"
        for line, target in imports_of(path):
            target_unit = unit_of(target)
            if target_unit != source and target_unit not in ALLOWED[source]:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {source} imports {target}")
    return bad


def test_every_import_points_down() -> None:
    bad = layer_violations()
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


PACKAGES = sorted(unit for unit in ALLOWED if unit != "assets")


@pytest.mark.parametrize("unit", PACKAGES)
def test_package_imports_alone_and_loads_nothing_above(unit: str) -> None:
    """Importing the package and all its modules in a fresh interpreter loads only what it may depend on."""
    modules = [module_name(p) for p in sorted(ROOT.rglob("*.py")) if unit_of(module_name(p)) == unit]
    modules = [m for m in modules if not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('\\n'.join(sorted({n.split('.')[1] for n in sys.modules if n.startswith('s1serve.')})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split()) - {unit}
    assert loaded <= ALLOWED[unit], f"importing {unit} loaded {sorted(loaded - ALLOWED[unit])}"
