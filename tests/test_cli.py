"""The command line: described commands and options, a version, clear refusals before anything loads."""

import argparse
import socket

import pytest

from logitfuse.cli import COMMANDS, build_parser, main


def run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as end:  # argparse ends --help, --version and usage errors this way
        rc = end.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_command_and_option_is_described(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS) == {"serve", "generate", "influence", "train-family", "tune-adapter",
                                                 "fetch-real"}
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 20, name
        undescribed = [a.dest for a in p._actions if not a.help]
        assert undescribed == [], f"{name}: options without help: {undescribed}"
        rc, out, _ = run(capsys, name, "--help")
        assert rc == 0 and p.description.split()[0] in out
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and all(name in out for name in COMMANDS)


def test_version(capsys):
    from importlib import metadata

    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"logitfuse {metadata.version('logitfuse')}"


def test_an_unknown_command_is_named_with_the_closest_one(capsys):
    rc, _, err = run(capsys, "serv")
    assert rc == 2 and "unknown command 'serv' (did you mean 'serve'?)" in err
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2 and "unknown command 'frobnicate'" in err and "did you mean" not in err


def test_bare_logitfuse_prints_help_and_fails_rather_than_serving(capsys, monkeypatch):
    monkeypatch.setattr("logitfuse.service.app.run_server", lambda *a, **k: pytest.fail("a server started"))
    rc, _, err = run(capsys)
    assert rc == 2 and "usage: logitfuse" in err and "serve" in err


def test_serve_refuses_a_port_in_use_before_loading_models(capsys, config_file, monkeypatch):
    monkeypatch.setattr("logitfuse.service.app.run_server", lambda *a, **k: pytest.fail("models would load"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, _, err = run(capsys, "serve", "--config", str(config_file), "--port", str(port))
    assert rc == 2 and f"cannot start: port {port} on 127.0.0.1 is already in use (choose another with --port)" in err


def test_serve_and_generate_end_cleanly_on_a_missing_config(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    rc, _, err = run(capsys, "serve", "--config", str(missing))
    assert rc == 2 and err.strip() == f"cannot start: no such config file {missing}"
    out = tmp_path / "out.jsonl"
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "x"}\n')
    rc, _, err = run(capsys, "generate", "--config", str(missing), "--model", "m", "--input",
                     str(tmp_path / "in.jsonl"), "--output", str(out))
    assert rc == 2 and err.strip() == f"cannot start: no such config file {missing}"
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "in.jsonl"]


def test_a_wrong_model_path_names_the_key(capsys, config_file, tmp_path):
    cfg = tmp_path / "bad.yaml"
    text = config_file.read_text()
    base_small = next(line.split("path: ")[1].split(",")[0] for line in text.splitlines() if "base-small:" in line)
    cfg.write_text(text.replace(base_small, base_small + "-typo"))
    rc, _, err = run(capsys, "generate", "--config", str(cfg), "--model", "proxy-a", "--input", str(cfg),
                     "--output", str(tmp_path / "o.jsonl"))
    assert rc == 2 and f"models.base-small.path: no such folder {base_small}-typo" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()
    rc, _, err = run(capsys, "generate", "--fusion", "[1]", "--model", "m", "--input", "i", "--output", "o")
    assert rc == 2 and "--fusion: must be a JSON object" in err


def imports_of(module: str) -> set[str]:
    """Every logitfuse module a module imports, at the top or inside functions."""
    import ast
    import importlib.util

    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("logitfuse")}


def test_the_command_and_batch_modules_import_in_one_direction():
    """cli -> batch -> batch_remote -> (batch_io, batch_lines, batch_job): nothing imports back up."""
    order = ["logitfuse.cli", "logitfuse.batch.local", "logitfuse.batch.server", "logitfuse.batch.job_file",
             "logitfuse.batch.line_params", "logitfuse.batch.records"]
    for i, module in enumerate(order):
        above = set(order[:i + 1]) - {module}
        assert not imports_of(module) & above, f"{module} imports {imports_of(module) & above}"
    assert "logitfuse.cli" not in set().union(*(imports_of(m) for m in order[1:]))
