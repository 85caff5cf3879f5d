"""The import paths of the flat layout (``hf_distill.objectives``, ``hf_distill.metrics``, …), kept working
for this release.

Each old module path resolves to the module that now holds its names (or, where a module was split,
to a view of the modules that do), with a `FutureWarning` that names the new path. The names exported
from `hf_distill` itself never moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

# Old module (under hf_distill) -> the module(s) that hold its names now, searched in order.
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "checksums": ("safety.checksums",),
    "devices": ("distributed",),
    "distillation_config": ("trainers.distillation_config",),
    "distillation_trainer": ("trainers.distillation_trainer",),
    "influence": ("losses.influence",),
    "label_checks": ("data.label_checks",),
    "learning_teacher_config": ("trainers.learning_teacher_config",),
    "learning_teacher_trainer": ("trainers.learning_teacher_trainer",),
    "lgtm_config": ("trainers.lgtm_config",),
    "lgtm_trainer": ("trainers.lgtm_trainer",),
    "master_weights": ("teacher.master_weights",),
    "meta_config": ("trainers.meta_config",),
    "meta_gradient": ("losses.meta_gradient",),
    "meta_trainer": ("trainers.meta_trainer",),
    "metrics": ("glue.metrics", "safety.collapse"),
    "model_card": ("publishing.model_card",),
    "model_sources": ("publishing.model_sources",),
    "nonfinite": ("safety.nonfinite",),
    "objectives": ("losses.objectives",),
    "online_config": ("trainers.online_config",),
    "online_trainer": ("trainers.online_trainer",),
    "quiz": ("data.quiz",),
    "quiz_config": ("trainers.quiz_config",),
    "quiz_trainer": ("trainers.quiz_trainer",),
    "redaction": ("safety.redaction",),
    "representation": ("losses.representation",),
    "representation_term": ("losses.representation_term",),
    "transfer": ("data.transfer",),
    "validation": ("safety.validation",),
}
PACKAGE = __name__.rpartition(".")[0]


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``hf_distill.<old name>`` after the regular finders found no such file."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, old = fullname.rpartition(".")
        if package != PACKAGE or old not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> types.ModuleType:
        old = spec.name.rpartition(".")[2]
        targets = [importlib.import_module(f"{PACKAGE}.{new}") for new in MOVED_MODULES[old]]
        warnings.warn(
            f"{spec.name} moved to {' and '.join(t.__name__ for t in targets)}; import from there (the old "
            "path goes away in the next release).",
            FutureWarning,
            stacklevel=2,
        )
        if len(targets) == 1:
            return targets[0]
        return _merged_view(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module(s) it stands for ran when they were imported."""


def _merged_view(name: str, targets: list[types.ModuleType]) -> types.ModuleType:
    """A module whose attributes are looked up in ``targets``, in order (an old module that was split)."""
    view = types.ModuleType(name, f"Moved: see {', '.join(t.__name__ for t in targets)}.")

    def __getattr__(attribute: str) -> Any:  # noqa: N807 (PEP 562 module hook)
        for module in targets:
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(f"module {name!r} has no attribute {attribute!r}")

    view.__getattr__ = __getattr__  # type: ignore[method-assign]
    view.__dir__ = lambda: sorted({n for t in targets for n in dir(t)})  # type: ignore[method-assign]
    return view


def install() -> None:
    """Let the old paths import (once per interpreter)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
