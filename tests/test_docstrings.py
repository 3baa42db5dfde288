"""Public functions document their arguments (issue 10), so a reader of the notebooks can call them from
``help()`` alone, and the documentation cannot rot silently when a parameter is added or renamed.

For every public function at module level and every public method of a public class in
``cascade_helpers`` that takes two or more parameters besides self/cls (nested functions excluded): the
docstring has an ``Args:`` section with one entry per parameter, in the Google style the package uses —
``name: ...``, or several names sharing one entry (``height, width: ...``), ``*args``/``**options``
named with their stars — and no entry for a parameter the function no longer has; a function whose
return annotation is not ``None`` has a ``Returns:`` section (``Yields:`` for a generator).

Private helpers (a leading underscore, at module level) need no Args/Returns, only a docstring line
that says *why* they exist (issue 19): the public API carries the sections, the rest stays short.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "cascade_helpers"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
SECTION = re.compile(r"^(\s*)Args:\s*$")
ENTRY = re.compile(r"^(\*{0,2}\w+(?:, \*{0,2}\w+)*):(\s|$)")
FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def public_functions(tree: ast.Module) -> list[tuple[str, FunctionNode]]:
    """Module-level functions and methods of module-level classes, both without a leading underscore."""
    found = []
    for node in tree.body:
        if isinstance(node, FunctionNode):
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            found += [(f"{node.name}.{m.name}", m) for m in node.body if isinstance(m, FunctionNode)]
    return [(name, node) for name, node in found if not node.name.startswith("_")]


def parameters(node: FunctionNode) -> list[str]:
    """Every parameter as a caller names it (``*args`` and ``**options`` with their stars)."""
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return [n for n in names if n not in ("self", "cls")]


def documented(docstring: str) -> list[str] | None:
    """The names the ``Args:`` section documents (None without one): each entry starts a line at the
    section's entry indentation with ``names:``; deeper-indented lines continue an entry."""
    lines = docstring.splitlines()
    starts = [i for i, line in enumerate(lines) if SECTION.match(line)]
    if not starts:
        return None
    section_indent = len(SECTION.match(lines[starts[0]]).group(1))
    names: list[str] = []
    entry_indent = None
    for line in lines[starts[0] + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= section_indent:
            break  # the next section (Returns:, Raises:) or prose after the section
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent:
            match = ENTRY.match(line.strip())
            if match is None:
                names.append(f"<not an entry: {line.strip()[:40]!r}>")
            else:
                names += match.group(1).split(", ")
    return names


def returns_something(node: FunctionNode) -> bool:
    returns = node.returns
    return returns is not None and not (isinstance(returns, ast.Constant) and returns.value is None)


def is_generator(node: FunctionNode) -> bool:
    """A ``yield`` in the function's own body (not in a function nested in it)."""
    stack = list(node.body)
    while stack:
        child = stack.pop()
        if isinstance(child, ast.Yield | ast.YieldFrom):
            return True
        if not isinstance(child, FunctionNode | ast.Lambda | ast.ClassDef):
            stack.extend(ast.iter_child_nodes(child))
    return False


def problems(source: str) -> list[str]:
    """What a module's public functions leave undocumented, one line per function."""
    found = []
    for name, node in public_functions(ast.parse(source)):
        params = parameters(node)
        if len(params) < 2:
            continue
        doc = ast.get_docstring(node)
        if not doc:
            found.append(f"{name} (line {node.lineno}): no docstring")
            continue
        names = documented(doc)
        if names is None:
            found.append(f"{name} (line {node.lineno}): no Args: section for {params}")
            continue
        missing = [p for p in params if p not in names]
        stale = [n for n in names if n not in params]
        if missing or stale:
            found.append(f"{name} (line {node.lineno}): Args: misses {missing}, names non-parameters {stale}")
        section = "Yields:" if is_generator(node) else "Returns:"
        if returns_something(node) and not re.search(rf"^\s*{section}\s*$", doc, re.MULTILINE):
            found.append(f"{name} (line {node.lineno}): returns {ast.unparse(node.returns)}, no {section}")
    return found


def undocumented_private(source: str) -> list[str]:
    """Module-level private functions and classes without a docstring."""
    return [
        f"{node.name} (line {node.lineno})"
        for node in ast.parse(source).body
        if isinstance(node, FunctionNode | ast.ClassDef)
        and node.name.startswith("_")
        and not ast.get_docstring(node)
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_helpers_say_why(path):
    found = undocumented_private(path.read_text())
    assert not found, f"{path.relative_to(PACKAGE.parent)}: one docstring line on why: " + ", ".join(found)


def test_the_private_check_finds_a_bare_helper():
    assert undocumented_private('def _f(a):\n    pass\n\n\ndef _g():\n    """Why."""\n') == ["_f (line 1)"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_public_functions_document_their_arguments(path):
    found = problems(path.read_text())
    assert not found, f"{path.relative_to(PACKAGE.parent)}:\n" + "\n".join(found)


GOOD = '''
def text_to_image(prior, decoder, prompt, negative_prompt="", *, progress=True, **options) -> Generation:
    """Pictures from a prompt.

    Args:
        prior, decoder: the loaded models.
        prompt: a prompt, or a list of prompts: one group of pictures each, as ``callback(step):``
            would say.
        negative_prompt: what guidance steers away from.
        progress: False hides the progress bars.
        **options: any other field.

    Returns:
        A Generation.
    """


class Trainer:
    def run(self, steps: int) -> None:
        """One parameter besides self: nothing required."""

    def _helper(self, a, b):
        pass

    def save(self, path, prefix) -> None:
        """Save.

        Args:
            path, prefix: where, and the key prefix.
        """


def outer(a, b):
    """Nested functions are not public API.

    Args:
        a, b: two numbers.
    """

    def inner(x, y):
        pass


def stream(a, b) -> Iterator[int]:
    """A generator documents what it yields.

    Args:
        a, b: the bounds.

    Yields:
        The numbers.
    """
    yield a


def make(a, b) -> Callable:
    """A function whose nested function is a generator returns.

    Args:
        a, b: the bounds.

    Returns:
        The generator function.
    """

    def numbers():
        yield a

    return numbers
'''


def _source(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


BAD = {
    "no-docstring": ("def f(a, b):\n    pass\n", ["f (line 1): no docstring"]),
    "prose-only": (
        'def f(a, b):\n    """Why, and a and b in prose."""\n',
        ["f (line 1): no Args: section for ['a', 'b']"],
    ),
    "stars": (
        _source(
            """
            def f(a, *rest, **options) -> int:
                \"\"\"Why.

                Args:
                    a, rest: the star is part of the name.

                Returns:
                    1.
                \"\"\"
            """
        ),
        ["f (line 1): Args: misses ['*rest', '**options'], names non-parameters ['rest']"],
    ),
    "no-returns": (
        _source(
            """
            def f(a, b) -> int:
                \"\"\"Why.

                Args:
                    a, b: two numbers.
                \"\"\"
            """
        ),
        ["f (line 1): returns int, no Returns:"],
    ),
    "method": (
        _source(
            """
            class C:
                def f(self, a, b) -> None:
                    \"\"\"Why.

                    Args:
                        a: one of two.
                    \"\"\"
            """
        ),
        ["C.f (line 2): Args: misses ['b'], names non-parameters []"],
    ),
    "stale-entry": (
        _source(
            """
            def f(a, b):
                \"\"\"Why.

                Args:
                    a, b: two numbers.
                    c: a parameter that was removed.
                \"\"\"
            """
        ),
        ["f (line 1): Args: misses [], names non-parameters ['c']"],
    ),
    "generator": (
        _source(
            """
            def f(a, b) -> Iterator[int]:
                \"\"\"Why.

                Args:
                    a, b: two numbers.

                Returns:
                    A generator says Yields:.
                \"\"\"
                yield a
            """
        ),
        ["f (line 1): returns Iterator[int], no Yields:"],
    ),
}


@pytest.mark.parametrize(("source", "expected"), BAD.values(), ids=BAD.keys())
def test_the_check_finds_what_is_missing(source, expected):
    assert problems(source) == expected


def test_the_check_accepts_the_package_style():
    """Grouped names, wrapped entries, stars, private classes and nested functions."""
    assert problems(GOOD) == []
    assert problems("class _C:\n    def f(self, a, b):\n        pass\n") == []
