"""The shape of the code, kept: short functions, and a map of core/ that names every package and module.
(The import layering and the absence of circles are import-linter's contracts in .importlinter, run by the
README's test command.)"""
import ast
import re

import pytest

from conftest import ROOT

LONGEST_FUNCTION = 60  # lines, docstring included


def python_files(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_function_in_the_engine_or_the_pages_is_over_60_lines():
    long = []
    for path in [*python_files("core", "pages"), ROOT / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these:\n" + "\n".join(long)


def packages():
    return sorted(p.parent for p in (ROOT / "core").glob("*/__init__.py"))


def test_the_map_in_core_names_every_package():
    doc = ast.get_docstring(ast.parse((ROOT / "core" / "__init__.py").read_text()), clean=False)
    listed = set(re.findall(r"^\s+(\w+)/\s", doc, re.M))
    assert listed == {p.name for p in packages()}


@pytest.mark.parametrize("package", packages(), ids=lambda p: p.name)
def test_each_package_lists_its_modules(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()), clean=False)
    listed = set(re.findall(r"^\s+(\w+\.py)\s", doc, re.M))
    assert listed == {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
