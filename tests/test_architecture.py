"""The shape of the code: no import circles, and everything a registry lists is
documented and offered where users look for it."""

from __future__ import annotations

import ast
import re

import pytest

from conftest import CONFIGS, REPO
from fedmpi.aggregation import PRE_STEPS, RULES
from fedmpi.algorithms import ALGORITHMS
from fedmpi.architectures import ARCHITECTURES
from fedmpi.attacks import ATTACKS
from fedmpi.data import DATASETS
from fedmpi.optimizers import OPTIMIZERS

PACKAGE = REPO / "fedmpi"


def import_graph(root) -> dict[str, set[str]]:
    """module -> package modules it imports (imports inside functions included), for
    the package in directory ``root``."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            found.update(c for c in candidates if c in modules and c not in (name, root.name))
        graph[name] = found
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(module, trail):
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                return [*trail, nxt]
            if nxt not in state:
                found = visit(nxt, [*trail, nxt])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_module_import_graph_is_acyclic():
    graph = import_graph(PACKAGE)
    assert "fedmpi.server" in graph and "fedmpi.privacy.accounting" in graph and "fedmpi.schema" in graph["fedmpi.config"]
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_check_sees_a_circle_made_by_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    assert find_circle(import_graph(package)) == ["pkg.a", "pkg.b", "pkg.a"]
    (package / "b.py").write_text("def f():\n    return 1\n")
    assert find_circle(import_graph(package)) is None


def _row(text: str, name: str) -> str | None:
    """The table row whose first cell names ``name`` (as `name` or `name(...)`)."""
    for line in text.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and re.search(rf"`{name}[`(]", cells[1]):
            return line
    return None


@pytest.mark.parametrize("doc, registry", [
    ("robustness.md", RULES), ("robustness.md", PRE_STEPS), ("robustness.md", ATTACKS), ("data.md", DATASETS),
    ("algorithms.md", ALGORITHMS),
])
def test_every_registry_entry_is_documented_with_its_paper(doc, registry):
    text = (REPO / "docs" / doc).read_text()
    for name, entry in registry.items():
        if name == "none":
            continue
        row = _row(text, name)
        assert row is not None, f"{name} has no row in docs/{doc}"
        cited = (getattr(entry, "paper", None) or entry.source).split()[0].rstrip(",")
        assert cited.lower() in row.lower(), f"docs/{doc}: the row of {name} does not cite {cited!r}"


@pytest.mark.parametrize("key, registry", [
    ("data.name", DATASETS), ("model.name", ARCHITECTURES), ("server.optimizer", OPTIMIZERS),
    ("aggregator.name", RULES), ("attack.name", ATTACKS), ("algorithm.name", ALGORITHMS),
])
def test_config_docs_and_default_yaml_list_exactly_the_registry(key, registry):
    section, leaf = key.split(".")
    yaml_text = (CONFIGS / "default.yaml").read_text()
    block = yaml_text.split(f"\n{section}:")[1]
    line = next(ln for ln in block.splitlines() if ln.strip().startswith(f"{leaf}:"))
    listed = [name.strip() for name in line.split("#", 1)[1].split("|")]
    assert listed == list(registry), f"default.yaml's comment on {key}"
    doc = (REPO / "docs" / "config.md").read_text()
    row = next(ln for ln in doc.splitlines() if ln.startswith(f"| `{key}` |"))
    allowed_cell = row.split("|")[3]
    assert re.findall(r"`([a-z_0-9]+)`", allowed_cell)[: len(registry)] == list(registry), f"docs/config.md's row of {key}"
