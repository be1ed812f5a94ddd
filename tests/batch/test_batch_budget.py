"""A local job under a memory budget that holds one ensemble at a time, fed lines that alternate ensembles:
every record right, its models pinned while it runs, the budget kept, no model loaded while it is loaded."""

import json

from logitfuse.api import LogitFuse
from logitfuse.batch.local import run_local
from logitfuse.batch.records import Stats, Writer, read_input
from logitfuse.cli import build_parser
from logitfuse.config.registry import Registry
from logitfuse.pool import ModelPool, default_loader

EXPERTS = ["a", "b", "a", "b", "a", "b"]  # proxy-a with its expert swapped per line: tuned-a, tuned-b, ...


def job(config_file, tmp_path, name: str, budget: int | None, batch: int):
    inp, out = tmp_path / "in.jsonl", tmp_path / f"{name}.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"the red city {i}", "fusion": {"experts": [e]}})
                           + "\n" for i, e in enumerate(EXPERTS)))
    reg, loads, worst = Registry.load(config_file), [], [0]

    def loader(registry, model):
        loads.append(model)
        return default_loader(registry, model)

    lf = LogitFuse(reg, ModelPool(reg, loader=loader, budget_bytes=budget))
    step = lf.step

    def watched_step():  # the bytes held while each step runs
        worst[0] = max(worst[0], sum(lf.model(n).param_bytes() for n in lf.pool.loaded()))
        return step()

    lf.step = watched_step
    args = build_parser().parse_args(["generate", "--config", str(config_file), "--model", "proxy-a", "--input",
                                      str(inp), "--output", str(out), "--temperature", "0", "--max-tokens", "5",
                                      "--batch-size", str(batch)])
    writer, stats = Writer(out), Stats()
    run_local(args, lf, list(read_input(inp)), writer, stats)
    writer.close()
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}, loads, worst[0], stats, lf


def test_lines_alternating_ensembles_under_a_one_ensemble_budget(config_file, tmp_path):
    probe = ModelPool(Registry.load(config_file))
    one = sum(probe.estimate(n) for n in ("base-large", "base-small", "tuned-a"))
    budget = one + probe.estimate("tuned-b") // 2  # one ensemble fits, two do not
    reference, _, _, _, _ = job(config_file, tmp_path, "reference", None, 1)  # every line alone, all loaded
    got, loads, worst, stats, lf = job(config_file, tmp_path, "budget", budget, 8)
    assert got == reference and len(got) == len(EXPERTS)
    assert (stats.failed, stats.errors) == (0, 0)
    assert worst <= budget  # never over the budget while a step ran
    assert loads.count("base-large") == loads.count("base-small") == 1  # shared and never evicted
    assert loads.count("tuned-a") == loads.count("tuned-b") == 3  # once per switch, never within a line
    assert lf.pool.room_for(["base-large", "base-small", "tuned-a"])  # nothing left pinned


def test_lines_whose_models_cannot_fit_together_get_an_error_record_each(config_file, tmp_path):
    got, _, _, stats, lf = job(config_file, tmp_path, "tiny", 200_000, 8)  # base-large alone is larger
    assert set(got) == {f"r{i}" for i in range(len(EXPERTS))} and stats.errors == len(EXPERTS)
    assert all("server.memory_budget_mb" in r["error"]["message"] and r["error"]["param"] == "model"
               for r in got.values())
    assert stats.failed == 0 and not lf.has_work()
