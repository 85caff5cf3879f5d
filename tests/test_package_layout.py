"""The package's layering (trainers on top; losses, data, teacher, publishing below; safety and distributed at
the bottom; glue beside, never imported by the library) and the old flat import paths that keep working."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import hf_distill
from hf_distill._moved_modules import MOVED_MODULES

PACKAGE = Path(hf_distill.__file__).resolve().parent

# Subpackage (or top-level module) -> the parts of hf_distill it may import.
ALLOWED = {
    "distributed": set(),
    "safety": {"safety"},
    "teacher": {"teacher", "safety", "distributed"},
    "losses": {"losses", "teacher", "safety", "distributed"},
    "data": {"data", "teacher", "safety", "distributed"},
    "publishing": {"publishing", "losses", "teacher", "safety", "distributed"},
    "callbacks": set(),
    "plotting": set(),
    "trainers": {"trainers", "losses", "data", "teacher", "publishing", "safety", "distributed", "callbacks"},
    "glue": {"glue"},
    "students": {"teacher", "distributed"},
    "evaluation": set(),
}


def _part(module: str) -> str:
    """The top-level part of hf_distill a dotted module name belongs to."""
    return module.split(".")[1]


def _imports(path: Path) -> list[str]:
    """Absolute names of the hf_distill modules a file imports."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                names += [target] if node.module else [f"{base}.{a.name}" for a in node.names]
            elif node.module and node.module.startswith("hf_distill"):
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("hf_distill")]
    return [n for n in names if n.count(".") >= 1]


def _library_files() -> list[Path]:
    return [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.parent != PACKAGE or p.stem not in ("__init__", "_moved_modules")
    ]


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_what_its_layer_allows(path):
    part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert part in ALLOWED, f"{part} is not placed in a layer: add it to ALLOWED"
    wrong = [name for name in _imports(path) if _part(name) not in ALLOWED[part] | {part}]
    assert not wrong, f"{path.relative_to(PACKAGE)} imports {wrong}, above or beside its layer"


def test_the_layering_check_sees_a_violation():
    # The check above must be able to fail: a relative import of the trainers from losses/ is caught.
    sample = PACKAGE / "losses" / "objectives.py"
    assert _part("hf_distill.trainers.lgtm_trainer") not in ALLOWED["losses"]
    assert {_part(n) for n in _imports(sample)} <= ALLOWED["losses"]
    assert _imports(PACKAGE / "trainers" / "online_trainer.py"), "relative imports were not resolved"


def test_every_public_name_imports_from_the_package():
    for name in hf_distill.__all__:
        value = getattr(hf_distill, name)
        assert value is not None, name


def test_importing_the_package_loads_neither_torch_nor_transformers():
    code = "import sys, hf_distill; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_still_imports_with_a_warning_naming_the_new_one(old):
    sys.modules.pop(f"hf_distill.{old}", None)
    with pytest.warns(FutureWarning, match=f"hf_distill.{old} moved to hf_distill.{MOVED_MODULES[old][0]}"):
        module = importlib.import_module(f"hf_distill.{old}")
    # Every name of the new module(s) is reachable through the old path, as the same object.
    seen: set[str] = set()
    for new in MOVED_MODULES[old]:  # a name held by several (a logger) comes from the first
        target = importlib.import_module(f"hf_distill.{new}")
        names = {n for n in vars(target) if not n.startswith("_")} - seen
        for name in names:
            assert getattr(module, name) is getattr(target, name), f"hf_distill.{old}.{name}"
        seen |= names


def test_a_split_module_resolves_each_name_to_its_new_home():
    sys.modules.pop("hf_distill.metrics", None)
    with pytest.warns(FutureWarning):
        metrics = importlib.import_module("hf_distill.metrics")
    from hf_distill.glue.metrics import glue_metrics
    from hf_distill.safety.collapse import warn_if_collapsed

    assert metrics.glue_metrics is glue_metrics
    assert metrics.warn_if_collapsed is warn_if_collapsed
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        metrics.nope  # noqa: B018


@pytest.mark.parametrize("old", ["teacher", "data", "publishing", "glue"])
def test_old_modules_that_became_packages_keep_their_names(old):
    # These paths are packages now; their __init__ re-exports what the flat module held.
    module = importlib.import_module(f"hf_distill.{old}")
    assert module.__all__ and all(hasattr(module, name) for name in module.__all__)


def test_an_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hf_distill.no_such_module")
