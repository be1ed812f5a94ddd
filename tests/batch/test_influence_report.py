"""`logitfuse generate` writes influence where a line or the job asks, and `logitfuse influence` reports on
the file: counts checked by hand on a small file, and against the records of a real run."""

import json

import pytest

from logitfuse.batch.influence_report import bucket, summarise
from logitfuse.cli import main


def _entry(token_id: int, fused_top: int, base_top: int, shift: float | None) -> dict:
    tok = lambda i: {"token": f"t{i}", "token_id": i, "logprob": -0.1}  # noqa: E731
    return {"token": f"t{token_id}", "token_id": token_id, "logprob": -0.1, "rank": 1, "base_logprob": -1.0,
            "base_rank": 2, "shift": shift, "base_choice": None, "top": [tok(fused_top)], "base_top": [tok(base_top)],
            "experts": []}


def _write(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_counts_by_hand(tmp_path):
    out = tmp_path / "out.jsonl"
    changed_at = {0, 2, 6, 21}  # answer A: 23 tokens, the fused argmax differs from the base's at these positions
    a = [_entry(5 if p in changed_at else 7, 5 if p in changed_at else 7, 7, 1.0 if p in changed_at else 0.0)
         for p in range(23)]
    b = [_entry(9, 9, 9, 0.5), _entry(5, 5, 8, 3.0)]  # answer B (a sampled choice of a second sample: n = 2)
    c = [_entry(4, 4, 4, None)]  # a shift left null (a remote base's top N)
    _write(out, [{"id": "a", "model": "m1", "text": "", "influence": a},
                 {"id": "b", "model": "m1", "choices": [{"text": "", "influence": b}, {"text": "", "influence": []}]},
                 {"id": "c", "model": "m2", "text": "", "influence": c},
                 {"id": "d", "model": "m2", "text": ""},  # asked for nothing
                 {"id": "e", "error": {"message": "bad", "param": None, "status": 400}}])
    rep = summarise(out)
    assert rep["records"] == 4 and rep["records_without_influence"] == 1
    m1 = rep["ensembles"]["m1"]
    assert (m1["records"], m1["tokens"], m1["changed"]) == (3, 25, 5)
    assert m1["changed_fraction"] == pytest.approx(5 / 25)
    pos = {p["position"]: (p["tokens"], p["changed"]) for p in m1["by_position"]}
    assert pos == {"0": (2, 1), "1": (2, 1), "2": (1, 1), "3": (1, 0), "4": (1, 0), "5-9": (5, 1),
                   "10-19": (10, 0), "20+": (3, 1)}
    assert m1["most_changed"][0] == {"token": "t5", "token_id": 5, "count": 5, "changes": 5,
                                     "mean_shift": pytest.approx((4 * 1.0 + 3.0) / 5)}
    assert len(m1["most_changed"]) == 1  # t7 and t9 never changed the choice
    assert [t["token_id"] for t in m1["largest_shift"]] == [5, 9, 7]
    m2 = rep["ensembles"]["m2"]
    assert (m2["tokens"], m2["changed"], m2["largest_shift"]) == (1, 0, [])


def test_buckets():
    assert [bucket(p) for p in (0, 4, 5, 9, 10, 19, 20, 500)] == ["0", "4", "5-9", "5-9", "10-19", "10-19", "20+",
                                                                   "20+"]


def test_a_file_without_influence_is_refused_clearly(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    _write(out, [{"id": "a", "model": "m", "text": "x"}])
    assert main(["influence", str(out)]) == 2
    assert "no record carries influence" in capsys.readouterr().err


def test_plot_needs_the_bench_extra(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    _write(out, [{"id": "a", "model": "m", "text": "", "influence": [_entry(1, 1, 2, 0.3)]}])
    png = tmp_path / "r.png"
    rc = main(["influence", str(out), "--plot", str(png)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 2 and "bench" in capsys.readouterr().err and not png.exists()
    else:
        assert rc == 0 and png.stat().st_size > 0


def test_generate_writes_influence_where_asked_and_the_report_reads_it(config_file, tmp_path, capsys):
    inp, out, rep = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "rep.json"
    _write(inp, [{"id": "asks", "prompt": "the red city", "fusion": {"influence": True}},
                 {"id": "two", "prompt": "king queen", "n": 2, "temperature": 1.0, "seed": 3,
                  "fusion": {"influence": True}},
                 {"id": "quiet", "prompt": "one two"}])
    assert main(["generate", "--config", str(config_file), "--model", "proxy-a", "--input", str(inp), "--output",
                 str(out), "--max-tokens", "6", "--temperature", "0"]) == 0
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "influence" not in json.dumps(recs["quiet"])
    assert len(recs["asks"]["influence"]) == recs["asks"]["completion_tokens"]
    assert all(e["experts"][0]["expert"] == "a" for e in recs["asks"]["influence"])
    lists = [recs["asks"]["influence"]] + [c["influence"] for c in recs["two"]["choices"]]
    capsys.readouterr()
    assert main(["influence", str(out), "--json", str(rep)]) == 0
    assert "proxy-a: fusion changed the base's greedy choice" in capsys.readouterr().out
    got = json.loads(rep.read_text())["ensembles"]["proxy-a"]
    assert got["records"] == 3 and got["tokens"] == sum(map(len, lists))
    assert got["changed"] == sum(e["top"][0]["token_id"] != e["base_top"][0]["token_id"] for es in lists for e in es)


def test_server_mode_writes_the_same_influence(config_file, tmp_path):
    from logitfuse.service.app import start_in_thread

    inp, local, remote = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    _write(inp, [{"id": "c", "prompt": "the red city"}, {"id": "m", "messages": [{"role": "user", "content": "king"}]}])
    job = ["--config", str(config_file), "--model", "proxy-a", "--input", str(inp), "--max-tokens", "4",
           "--temperature", "0", "--fusion", '{"influence": true}']
    url, srv = start_in_thread(config_file)
    try:
        assert main(["generate", *job, "--output", str(local)]) == 0
        assert main(["generate", *job, "--output", str(remote), "--server", url, "--concurrency", "1"]) == 0
    finally:
        srv.should_exit = True
    by_id = lambda p: {r["id"]: r["influence"] for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
    got, want = by_id(remote), by_id(local)
    assert set(got) == {"c", "m"} and all(len(v) == 4 for v in got.values())
    for rid in got:
        assert [e["token_id"] for e in got[rid]] == [e["token_id"] for e in want[rid]]
        assert [e["shift"] for e in got[rid]] == pytest.approx([e["shift"] for e in want[rid]], abs=1e-5)
