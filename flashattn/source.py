"""The package's own source code as text, for the book to print.

A chapter shows the code that runs, read from the package rather than copied
into the page. Reading it as text, without importing the module, means that a
kernel module's source can be shown on a machine without triton.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def module_source(module: str) -> str:
    """The source text of the package module ``module`` (e.g. ``"flashattn.triton.kernels"``), not imported."""
    if module != "flashattn" and not module.startswith("flashattn."):
        raise ValueError(f"module must be one of flashattn's modules, got {module!r}")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"module {module!r} is not a Python module of flashattn")
    return Path(spec.origin).read_text(encoding="utf-8")


def function_source(module: str, name: str) -> str:
    """The source text of the top-level function or class ``name`` of ``module``, decorators included.

    Raises ``ValueError`` naming the module and the names it does define when
    ``name`` is not one of them, so that a renamed function fails loudly.
    """
    text = module_source(module)
    tree = ast.parse(text)
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    defined = [node for node in tree.body if isinstance(node, kinds)]
    for node in defined:
        if node.name == name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "\n".join(text.splitlines()[first - 1 : node.end_lineno])
    names = ", ".join(node.name for node in defined)
    raise ValueError(f"{module} defines no function or class {name!r}; it defines: {names}")
