"""`module:function` paths (a tool's `cost` and `settle`): checked, then imported when used.

`check_function_path` finds the module's file without importing it or its packages (one
level at a time, with `importlib.machinery.PathFinder`) and parses it with `ast`: the module
must exist, parse, and define the name at its top level. So `throttle check` runs no
module's import-time code. It imports the module after all when the file cannot tell: no
Python source (a compiled extension), a star import or a module-level `__getattr__`, or when
asked to (`import_it`, `throttle check --import`). `load_function` imports (workers do).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from importlib.machinery import PathFinder
from pathlib import Path

EXAMPLE = "'workers.tools.llm:estimate_tokens'"


def split_path(path: str) -> tuple[str, str]:
    """('package.module', 'function') of 'package.module:function', or a ValueError."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute.isidentifier():
        raise ValueError(f"{path!r} is not 'module:function', e.g. {EXAMPLE}")
    return module_name, attribute


@functools.cache
def load_function(path: str) -> Callable[..., float]:
    """Import 'package.module:function' (runs the module's import-time code)."""
    module_name, attribute = split_path(path)
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import function {path!r}: {exc}") from None
    except Exception as exc:  # the module's own code failed while importing
        raise ValueError(f"importing {module_name!r} for {path!r} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    if not callable(function):
        raise ValueError(f"{path!r} is not callable")
    return function  # type: ignore[no-any-return]


def check_function_path(path: str, *, import_it: bool = False) -> None:
    """A ValueError saying what is wrong unless `path` names a function that can be loaded."""
    module_name, attribute = split_path(path)
    if import_it or module_name in sys.modules:  # nothing left to run for a loaded module
        load_function(path)
        return
    try:
        source = _source_file(module_name)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot find module {module_name!r} of {path!r} ({exc}); check the "
                         "spelling and that it is installed where the workers run") from None
    if source is None:
        load_function(path)
        return
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except (SyntaxError, ValueError, OSError) as exc:
        raise ValueError(f"module {module_name!r} ({source}) of {path!r} does not parse: "
                         f"{exc}") from None
    names, dynamic = _top_level_names(tree.body)
    if attribute in names:
        return
    if dynamic:
        load_function(path)
        return
    raise ValueError(f"module {module_name!r} ({source}) defines no {attribute!r} at its top "
                     f"level; name a function it defines, e.g. {EXAMPLE}")


def _source_file(module_name: str) -> Path | None:
    """The module's .py file, found without importing anything; None if it has none."""
    parts = module_name.split(".")
    spec = importlib.util.find_spec(parts[0])  # a top-level name: nothing is imported
    for depth in range(1, len(parts)):
        if spec is None:
            break
        if spec.submodule_search_locations is None:
            raise ImportError(f"{'.'.join(parts[:depth])!r} is a module, not a package")
        spec = PathFinder.find_spec(".".join(parts[: depth + 1]),
                                    list(spec.submodule_search_locations))
    if spec is None:
        raise ImportError(f"no module named {module_name!r}")
    origin = spec.origin
    if not (spec.has_location and origin and origin.endswith(".py")):
        return None
    return Path(origin)


def _top_level_names(body: Iterable[ast.stmt]) -> tuple[set[str], bool]:
    """Names a module body binds (also inside top-level if / try / with), and whether it
    may bind others at run time (a star import, a module `__getattr__`)."""
    names: set[str] = set()
    dynamic = False
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            dynamic |= node.name == "__getattr__"
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                dynamic |= alias.name == "*"
                names.add(alias.asname or alias.name.split(".")[0])
        nested = [getattr(node, field, []) for field in ("body", "orelse", "finalbody")]
        nested += [handler.body for handler in getattr(node, "handlers", [])]
        if isinstance(node, ast.If | ast.Try | ast.With):
            for block in nested:
                inner, inner_dynamic = _top_level_names(block)
                names |= inner
                dynamic |= inner_dynamic
    return names, dynamic
