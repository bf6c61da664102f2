"""Layers that only look down: every import under tunelab/ (at the top of a file or inside a
function, absolute or relative) goes to its own layer or a lower one, and no library module
imports a command module (`tunelab/*/cli.py`, `tunelab/__main__.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tunelab"

# bottom first; a module imports from its own layer and the ones below it
LAYERS = (
    ("tunelab", "tunelab.errors", "tunelab.io", "tunelab.device"),  # the floor, for everyone
    ("tunelab.tasks",),  # task spec, readers, templates, verbalizers, demonstrations
    ("tunelab.models",),  # loading backbones
    ("tunelab.lm",),  # the forward pass: scoring, prediction, the cached head, decoding
    ("tunelab.methods",),
    ("tunelab.train",),
    ("tunelab.artifact",),
    ("tunelab.evaluate",),
    ("tunelab.pipeline",),  # one run from a task to a scored artifact (train, score, save)
    ("tunelab.compare", "tunelab.serve"),  # side by side: neither imports the other
    ("tunelab.api",),  # the Python API, which the commands call
)
SIDE_BY_SIDE = {"tunelab.compare", "tunelab.serve"}
CLI = len(LAYERS)  # the command modules, above everything


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_cli(module: str) -> bool:
    parts = module.split(".")
    return module == "tunelab.__main__" or (len(parts) == 3 and parts[2] == "cli")


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, owner): the layer's index and the entry of LAYERS the module falls under."""
    if is_cli(module):
        return CLI, "cli"
    best = None
    for rank, owners in enumerate(LAYERS):
        for owner in owners:
            inside = module == owner or (owner != "tunelab" and module.startswith(owner + "."))
            if inside and (best is None or len(owner) > len(best[1])):
                best = rank, owner
    return best


def imports(module: str, source: str, is_package: bool, modules: set[str]):
    """(line, imported module, inside a function) for each tunelab import of `source`."""
    tree = ast.parse(source)
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1 packages
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == "tunelab" or target.startswith("tunelab."):
                yield node.lineno, target, id(node) in in_function


def violations(sources: dict[str, tuple[str, str, bool]], modules: set[str]) -> list[tuple]:
    """(importer, imported, message) for each import that climbs, crosses between compare and
    serve, or reaches a command module from library code. `sources`: module name ->
    (file shown in messages, source text, whether it is a package's __init__)."""
    found = []
    for module, (shown, source, is_package) in sorted(sources.items()):
        mine = layer_of(module)
        if mine is None:
            found.append((module, None, f"{shown}: {module} is in no layer; add it to LAYERS"))
            continue
        for line, target, lazy in imports(module, source, is_package, modules):
            theirs = layer_of(target)
            where = f"{shown}:{line}: {module} ({mine[1]}) imports {target}"
            if theirs is None:
                problem = "which is in no layer"
            elif is_cli(target) and mine[0] != CLI:
                problem = "a command module, from library code"
            elif module == "tunelab" and target == "tunelab.api" and lazy:
                continue  # the package re-exports the API, imported on first use
            elif theirs[0] > mine[0]:
                problem = f"from the higher layer {theirs[1]}"
            elif theirs[0] == mine[0] and {mine[1], theirs[1]} <= SIDE_BY_SIDE:
                if mine[1] == theirs[1]:
                    continue
                problem = f"beside it ({theirs[1]}): they stand side by side"
            else:
                continue
            found.append((module, target, f"{where}, {problem}"))
    return found


def package_sources() -> tuple[dict[str, tuple[str, str, bool]], set[str]]:
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts]
    sources = {
        module_name(p): (
            str(p.relative_to(PACKAGE.parent)),
            p.read_text(encoding="utf-8"),
            p.name == "__init__.py",
        )
        for p in files
    }
    return sources, set(sources)


def test_every_import_looks_down():
    sources, modules = package_sources()
    assert len(sources) > 50  # the package was found
    found = violations(sources, modules)
    wrong = [msg for _importer, _target, msg in found]
    assert not wrong, "imports against the layers (README, Layout):\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "importer, source",
    [
        ("tunelab.methods.prompt_tuning", "from tunelab.train.checkpoint import atomic_save"),
        ("tunelab.methods.base", "def f():\n    from tunelab.train.checkpoint import load\n"),
        ("tunelab.methods.lora", "from ..train import checkpoint"),
        ("tunelab.methods.hybrid", "def f():\n    from tunelab.artifact import read_meta\n"),
        ("tunelab.train.loop", "from tunelab.evaluate.predict import predict_logprobs"),
        ("tunelab.train.config", "def f():\n    from tunelab.evaluate.predict import native_bf16"),
        ("tunelab.serve.app", "from tunelab.evaluate.cli import _distribution"),
        ("tunelab.serve.forward", "import tunelab.evaluate.cli as cli"),
        ("tunelab.compare.run", "from tunelab.serve import app"),
        ("tunelab.models.load", "import tunelab.lm.scoring"),
        ("tunelab.tasks.spec", "from tunelab import methods"),
        ("tunelab.io", "from . import artifact"),
        ("tunelab", "from tunelab.api import load"),  # at import time: a cycle
        ("tunelab.api", "from tunelab.train import cli"),
        ("tunelab.newfolder.thing", "from tunelab.errors import TunelabError"),
    ],
)
def test_the_checker_flags_an_import_of_each_kind(importer, source):
    _, modules = package_sources()
    found = violations({importer: ("fake.py", source, False)}, modules | {importer, "tunelab.api"})
    assert len(found) == 1, found
    assert found[0][2].startswith("fake.py:"), found


@pytest.mark.parametrize(
    "importer, source",
    [
        ("tunelab.methods.lora", "from tunelab.io import atomic_save\nfrom . import base"),
        ("tunelab.evaluate.predict", "from tunelab.train import distributed"),
        ("tunelab.serve.store", "from tunelab import artifact, __version__"),
        ("tunelab.train.cli", "from tunelab.evaluate.cli import run\nimport tunelab.api"),
        ("tunelab", "def __getattr__(name):\n    from tunelab import api\n"),
    ],
)
def test_the_checker_lets_imports_that_look_down_pass(importer, source):
    _, modules = package_sources()
    sources = {importer: ("fake.py", source, False)}
    assert violations(sources, modules | {importer, "tunelab.api"}) == []
