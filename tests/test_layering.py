"""The layering, read from the source: the engine's state is its own, imports form no circles, and the
service sits on the library (never the reverse)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("logitfuse",)
FRONT_ENDS = {"logitfuse.cli", "logitfuse.service.ray_serve"}


def sources(*folders: str) -> dict[str, Path]:
    """Module name -> file for every module under the folders."""
    out = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def engine_api() -> tuple[set[str], set[str]]:
    """(public names of Engine: its methods, properties and plain attributes; its private fields)."""
    tree = ast.parse((ROOT / "logitfuse" / "engine" / "core.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    public = {n.name for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    fields = {t.attr for n in ast.walk(cls) if isinstance(n, (ast.Assign, ast.AnnAssign))
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
              if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return public | {f for f in fields if not f.startswith("_")}, {f for f in fields if f.startswith("_")}


def test_no_module_outside_the_engine_touches_its_state():
    public, private = engine_api()
    assert {"add", "check", "abort", "step", "run", "fail_all", "stats", "alignment", "sample_rows"} <= public
    assert {"_seqs", "_slots", "_waiting", "_spec_groups", "_kv_reserved", "_fuser"} <= private
    bad = []
    for folder in (*PACKAGES, "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "logitfuse" / "engine" / "core.py":
                continue
            for n in ast.walk(ast.parse(path.read_text())):
                if not isinstance(n, ast.Attribute):
                    continue
                on_engine = (isinstance(n.value, ast.Name) and n.value.id == "engine") or (
                    isinstance(n.value, ast.Attribute) and n.value.attr == "engine")
                if n.attr in private or (on_engine and n.attr not in public):
                    bad.append(f"{path.relative_to(ROOT)}:{n.lineno} .{n.attr}")
    assert not bad, bad


def imports(path: Path, known: set[str]) -> set[str]:
    """Library modules a module imports anywhere (functions included), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                   for b in n.body for x in ast.walk(b)}
    out = set()
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        if isinstance(n, ast.ImportFrom) and n.module:
            out |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in known else n.module for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
    return out & known


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle (as the modules on it, from each start), by depth-first search."""
    found = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.append(path)
                elif nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def test_imports_form_no_circles():
    mods = sources(*PACKAGES)
    graph = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    assert graph["logitfuse.api"] >= {"logitfuse.engine.core"} and "logitfuse.api" in graph["logitfuse.runner"]
    bad = circles(graph)
    assert not bad, bad
    # the scan finds a circle where there is one
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["b", "c", "a"],
                                                                            ["c", "a", "b"]]


def test_the_library_never_imports_the_service():
    """Only the front ends that start the server (the command line, the Ray Serve deployment) sit above both."""
    mods = sources(*PACKAGES)
    lib = [m for m in mods if not m.startswith("logitfuse.service") and m not in FRONT_ENDS]
    assert not [(m, i) for m in lib for i in imports(mods[m], set(mods)) if i.startswith("logitfuse.service")]
