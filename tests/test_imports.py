"""The modules of genre_ray import each other without a cycle, counting imports inside
functions too: each stage reads in one direction. So do the packages: tests/ imports
bench/, never the other way."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "genre_ray"


def imports(path: Path, modules: set[str]) -> set[str]:
    """The genre_ray modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "genre_ray":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("genre_ray."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("genre_ray.")}
    return (found & modules) - {path.stem}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path that comes back to its start, or None."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        found = next(filter(None, (walk(n, path + [node]) for n in sorted(graph[node]))), None)
        done.add(node)
        return found

    return next(filter(None, (walk(n, []) for n in sorted(graph))), None)


def test_no_module_imports_itself_through_others():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {p.stem: imports(p, modules) for p in PACKAGE.glob("*.py")}
    assert len(graph) >= 20 and graph["training"] >= {"optim", "errors"}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def packages_imported(path: Path) -> set[str]:
    """The top-level packages `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found


def test_benches_never_import_the_tests():
    """Tests import bench/ (its cluster and S3 helpers, its benches); the other way would
    make the two packages one cycle."""
    bench = PACKAGE.parent / "bench"
    importing = sorted(p.name for p in bench.glob("*.py") if "tests" in packages_imported(p))
    assert importing == []
    assert "bench" in packages_imported(PACKAGE.parent / "tests" / "test_cluster.py")
