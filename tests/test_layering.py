"""The layering, read from the source: import-linter's contracts (pyproject.toml) hold and catch a lower layer
importing a higher one; nothing outside the engine touches engine state; front ends use the facade."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
ENGINE = ROOT / "logitfuse" / "engine"
FRONT_ENDS = [ROOT / "logitfuse" / d for d in ("service", "batch", "vllm")] + [ROOT / "bench"]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "lint-imports"
    if not script.exists():
        pytest.skip("import-linter is not installed (the dev extra)")
    env = {"PATH": str(script.parent), "PYTHONPATH": str(cwd), "HOME": str(cwd)}
    return subprocess.run([str(script), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("ops/fusion.py", "from logitfuse.engine import core", "layers, top to bottom BROKEN"),
    ("batch/records.py", "import logitfuse.service.protocol", "layers, top to bottom BROKEN"),
    ("service/formats.py", "from logitfuse.engine.sequence import Sequence",
     "the engine's internals stay in the engine BROKEN"),
])
def test_a_broken_layer_fails_the_lint(tmp_path, module, line, contract):
    """A copy of the package with one import that breaks a contract: lint-imports says so and exits non-zero."""
    shutil.copytree(ROOT / "logitfuse", tmp_path / "logitfuse", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "logitfuse" / module
    text = target.read_text()
    target.write_text(text.replace("from __future__ import annotations\n",
                                   f"from __future__ import annotations\n\n{line}  # noqa\n", 1))
    out = lint_imports(tmp_path)
    assert out.returncode != 0 and contract in out.stdout, out.stdout + out.stderr


def engine_fields() -> tuple[set[str], set[str]]:
    """(the Engine's public API: methods, properties and public attributes; private fields of every class
    of the engine package)."""
    public, private = set(), set()
    for path in ENGINE.glob("*.py"):
        for cls in (n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)):
            fields = {t.attr for n in ast.walk(cls) if isinstance(n, (ast.Assign, ast.AnnAssign))
                      for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                      if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
            private |= {f for f in fields if f.startswith("_")}
            if cls.name == "Engine" and path.name == "core.py":
                public |= {n.name for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
                public |= {f for f in fields if not f.startswith("_")}
    return public, private


def test_no_module_outside_the_engine_touches_its_state():
    """Private fields of the engine's classes, on any receiver, and non-API names on anything called engine."""
    public, private = engine_fields()
    assert {"add", "check", "abort", "step", "run", "fail_all", "stats", "alignment", "sample_rows"} <= public
    assert {"_seqs", "_slots", "_waiting", "_spec_groups", "_kv_reserved", "_fuser"} <= private
    bad = []
    for path in sorted([*(ROOT / "logitfuse").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        if ENGINE in path.parents:
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if not isinstance(n, ast.Attribute):
                continue
            receiver = ast.unparse(n.value)
            if receiver == "self":  # a class's own fields (another class may use the same private name)
                continue
            if n.attr in private or (re.search(r"(^|\.|_)engine$", receiver) and n.attr not in public):
                bad.append(f"{path.relative_to(ROOT)}:{n.lineno} {receiver}.{n.attr}")
    assert not bad, bad


def test_front_ends_use_the_facade():
    """The service, batch jobs, Ray Serve and the benchmarks never reach into the pool, engine or registry of
    a LogitFuse (its public methods say what they need)."""
    reach = re.compile(r"\b(lf|self\.lf|sv\.lf|serving\.lf)\.(pool|engine|registry)\b")
    bad = [f"{p.relative_to(ROOT)}:{i}" for folder in FRONT_ENDS for p in sorted(folder.rglob("*.py"))
           for i, line in enumerate(p.read_text().splitlines(), 1) if reach.search(line)]
    assert not bad, bad
