"""The public API is what its users name, and nothing else (issue 19).

A top-level name without a leading underscore in a ``cascade_helpers`` module is public. It must be
named by one of its users: a notebook's code, the README (code blocks and inline code), a command
line (``download_models.sh``, ``pyproject.toml``'s scripts, ``python -m`` entry points, the
``benchmarks/`` scripts the README runs), or another module's public definition (its body or
signature), or it must appear in the signature of a public function or class of its own module (a
default, an annotation: what ``help()`` shows). Everything else gets a leading underscore or moves
inside the one place that uses it.

One import path per name: subpackage ``__init__`` files hold a docstring and no imports, nothing
re-exports another module's name, and no module keeps an ``__all__``.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "cascade_helpers"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
PUBLIC_NAMES_GOAL = 150
Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def module_name(path: Path) -> str:
    """``cascade_helpers/lora/load.py`` → ``cascade_helpers.lora.load`` (a package → its name)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def defined_names(node: ast.stmt) -> list[str]:
    """The names a top-level statement binds (definitions and assignments; imports are not definitions)."""
    if isinstance(node, Definition):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def public_definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    return {
        name: node
        for node in tree.body
        for name in defined_names(node)
        if not name.startswith("_") and name != "__all__"
    }


def is_public_statement(node: ast.stmt) -> bool:
    """A statement whose code a user reaches: a public definition, or module-level code that is not a
    private definition (a private function is reached only through a public one, which is checked)."""
    names = defined_names(node)
    if names:
        return any(not n.startswith("_") for n in names)
    return not isinstance(node, ast.Import | ast.ImportFrom)


def signature_nodes(node: ast.stmt) -> list[ast.AST]:
    """What ``help()`` shows of a public definition: its parameters' annotations and defaults, its
    return annotation; for a class, the same of its public methods and its bases and fields."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        a = node.args
        return [
            *(x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs if x.annotation),
            *(x.annotation for x in (a.vararg, a.kwarg) if x is not None and x.annotation),
            *a.defaults,
            *(d for d in a.kw_defaults if d is not None),
            *([node.returns] if node.returns else []),
        ]
    if isinstance(node, ast.ClassDef):
        found: list[ast.AST] = list(node.bases)
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and (
                not item.name.startswith("_") or item.name == "__init__"
            ):
                found += signature_nodes(item)
            elif isinstance(item, ast.AnnAssign):
                found += [item.annotation, *([item.value] if item.value else [])]
        return found
    return []


def names_in(nodes: list[ast.AST]) -> set[str]:
    """Every bare name and attribute name the nodes mention."""
    found = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Name):
                found.add(node.id)
            elif isinstance(node, ast.Attribute):
                found.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.update(re.findall(r"[A-Za-z_]\w*", node.value))  # string annotations
    return found


@cache
def trees() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in MODULES}


@cache
def used_by_other_modules() -> dict[str, set[str]]:
    """module → names its public statements mention, with the module each imported name comes from.

    Keyed by the defining module: ``{"cascade_helpers.files": {"STAGE_A", ...}}``.
    """
    used: dict[str, set[str]] = {}
    for name, tree in trees().items():
        origin: dict[str, tuple[str, str | None]] = {}  # local name → (module, name or None for a module)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = resolve(name, node)
                for alias in node.names:
                    local = alias.asname or alias.name
                    if f"{base}.{alias.name}" in trees():
                        origin[local] = (f"{base}.{alias.name}", None)
                    else:
                        origin[local] = (base, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("cascade_helpers.") and alias.asname:
                        origin[alias.asname] = (alias.name, None)
        public_nodes = [n for n in tree.body if is_public_statement(n)]
        for node in ast.walk(ast.Module(body=public_nodes, type_ignores=[])):
            if isinstance(node, ast.Name) and node.id in origin and origin[node.id][1]:
                module, imported = origin[node.id]
                used.setdefault(module, set()).add(imported)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in origin
                and origin[node.value.id][1] is None
            ):
                used.setdefault(origin[node.value.id][0], set()).add(node.attr)
    return used


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from, relative imports included."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = (PACKAGE.parent / Path(*package) / "__init__.py").exists()
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def user_text() -> str:
    """Everything a user of the package reads or runs: notebook code, the README, the command lines."""
    texts = []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        texts += ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    readme = (ROOT / "README.md").read_text()
    texts += re.findall(r"```[a-z]*\n(.*?)```", readme, re.DOTALL)
    texts += re.findall(r"`([^`\n]+)`", readme)
    texts += [p.read_text() for p in sorted((ROOT / "benchmarks").glob("*.py"))]
    texts += [(ROOT / "download_models.sh").read_text(), (ROOT / "pyproject.toml").read_text()]
    texts += [p.read_text() for p in MODULES if p.name == "__main__.py"]
    return "\n".join(texts)


def unused_public_names(module: str) -> list[str]:
    tree = trees()[module]
    definitions = public_definitions(tree)
    in_signatures = names_in([n for d in definitions.values() for n in signature_nodes(d)])
    others = used_by_other_modules().get(module, set())
    text = user_text()
    return [
        name
        for name in definitions
        if name not in others and name not in in_signatures and not re.search(rf"\b{re.escape(name)}\b", text)
    ]


@pytest.mark.parametrize("module", [module_name(p) for p in MODULES])
def test_every_public_name_has_a_user(module):
    unused = unused_public_names(module)
    assert not unused, (
        f"{module}: {unused} are named by no notebook, README, command line or other module's public "
        "code: give them a leading underscore, or move them into the one place that uses them"
    )


def test_the_public_api_is_small():
    count = sum(len(public_definitions(tree)) for tree in trees().values())
    assert count <= PUBLIC_NAMES_GOAL, f"{count} public names (goal ≤ {PUBLIC_NAMES_GOAL})"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_one_import_path_per_name(path):
    """No ``__all__``, and an ``__init__`` re-exports nothing: each name is imported from where it is
    defined (``upstream`` aside: it re-exports diffusers' names, which is its purpose)."""
    tree = ast.parse(path.read_text())
    if path.name == "upstream.py":
        return  # the one module whose purpose is to re-export (diffusers' deprecated Stable Cascade names)
    assert "__all__" not in {n for node in tree.body for n in defined_names(node)}, "drop __all__"
    if path.name == "__init__.py":
        imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not imports, f"{path.relative_to(ROOT)} re-exports: import each name from its own module"


def test_the_check_sees_users():
    """The checks above could pass by seeing nothing: known users are found."""
    assert "load_prior" not in unused_public_names("cascade_helpers.loading")  # notebooks
    assert "STAGE_C" in used_by_other_modules()["cascade_helpers.files"]  # another module's code
    assert "main" not in unused_public_names("cascade_helpers.download")  # pyproject's scripts
    fake = ast.parse("def f(x: Helper = DEFAULT) -> Result:\n    pass\n").body[0]
    assert names_in(signature_nodes(fake)) == {"Helper", "DEFAULT", "Result"}
