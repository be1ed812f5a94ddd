"""Start-up with bad entries: refused with all of them named, or (server.on_bad_entry: skip) served
without them and listed in /health."""

import pytest
from fastapi.testclient import TestClient

from logitfuse.service.app import create_app


def broken_config(config_file, tmp_path, mode):
    """The tiny registry plus a vocabulary mismatch (found only once models load), a folder that does not
    exist and an ensemble that names an unknown expert (both found before anything loads)."""
    text = config_file.read_text().replace("ensembles:\n", "ensembles:\n"
                                           "  mixed: {base: base-large, method: proxy, experts: [alien]}\n"
                                           "  ghost: {base: base-large, experts: [nobody]}\n")
    text = text.replace("models:\n", f"models:\n  lost: {{path: {tmp_path / 'lost'}}}\n")
    text = text.replace("server: {", f"server: {{on_bad_entry: {mode}, ")
    cfg = tmp_path / f"{mode}.yaml"
    cfg.write_text(text)
    return cfg


def test_skip_serves_without_the_broken_entries_and_lists_them(config_file, tmp_path):
    with TestClient(create_app(broken_config(config_file, tmp_path, "skip"))) as c:
        skipped = c.get("/health").json()["skipped"]
        assert sorted(skipped) == ["ensembles.ghost", "ensembles.mixed", "models.lost"]
        assert skipped["models.lost"] == f"models.lost.path: no such folder {tmp_path / 'lost'}"
        assert "vocabulary mismatch between 'base-large' and 'foreign'" in skipped["ensembles.mixed"]
        assert "expert 'nobody' not found" in skipped["ensembles.ghost"]
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "proxy-a" in ids and not {"mixed", "ghost", "lost"} & set(ids)
        r = c.post("/v1/completions", json={"model": "mixed", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 404
        r = c.post("/v1/completions", json={"model": "proxy-a", "prompt": "the red", "max_tokens": 2,
                                            "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_refuse_names_every_bad_entry_before_loading(config_file, tmp_path, monkeypatch):
    from logitfuse.pool import ModelPool

    monkeypatch.setattr(ModelPool, "get", lambda *a: pytest.fail("a model loaded"))
    with pytest.raises(ValueError) as err:
        create_app(broken_config(config_file, tmp_path, "refuse"))
    text = str(err.value)
    assert "2 bad entries" in text and "models.lost.path: no such folder" in text and "ensembles.ghost" in text


def test_refuse_stops_on_mismatched_vocabularies_before_loading_weights(config_file, tmp_path, monkeypatch):
    from logitfuse.pool import ModelPool

    monkeypatch.setattr(ModelPool, "get", lambda *a: pytest.fail("a model loaded"))
    cfg = broken_config(config_file, tmp_path, "refuse")
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if "lost:" not in line
                             and "ghost:" not in line))
    app = create_app(cfg)
    with pytest.raises(ValueError, match=r"1 ensemble\(s\) failed to load:\n  ensembles\.mixed: vocabulary mismatch"), \
            TestClient(app):
        pass
