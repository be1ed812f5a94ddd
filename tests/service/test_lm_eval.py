"""EleutherAI lm-evaluation-harness drives the real server as one model (`local-completions`): a
multiple-choice task on held-out facts, scored from echo logprobs, equals the library's own scoring.
Skipped where lm-eval is not installed (`pip install "lm-eval[api]"`; .ci/run installs it)."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from logitfuse import LogitFuse, SamplingParams
from logitfuse.service.app import start_in_thread
from logitfuse.training.family import world as W

if importlib.util.find_spec("lm_eval") is None:
    pytest.skip("lm-eval is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
TASK = """task: family_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""


def write_task(folder: Path, n: int = 12) -> list[dict]:
    w, rng = W.build_world(0), random.Random(0)
    capitals = [w.facts[e]["capital"] for e in w.facts]
    rows = []
    for e in w.eval_entities[:n]:
        right = w.facts[e]["capital"]
        choices = [right, *rng.sample([c for c in capitals if c != right], 3)]
        rng.shuffle(choices)
        rows.append({"prompt": f"<|user|> what is the capital of {e} ? <|assistant|>", "choices": choices,
                     "label": choices.index(right)})
    (folder / "capitals.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "capitals.yaml").write_text(TASK.format(data=folder / "capitals.jsonl"))
    return rows


def test_lm_eval_scores_a_fused_model_through_the_server(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = write_task(tmp_path)
    lf = LogitFuse(ROOT / "configs" / "default.yaml")
    url, server = start_in_thread(lf)
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={url}/v1/completions,model=large-qa,tokenizer_backend=huggingface,"
                       f"tokenizer={ROOT / 'models' / 'base-large'},num_concurrent=2,max_retries=1",
            tasks=["family_capitals"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    finally:
        server.should_exit = True
    assert out["results"]["family_capitals"]["acc,none"] >= 0.8
    tok = lf.pool.get("base-large").tokenizer
    for sample in out["samples"]["family_capitals"][:3]:
        row = rows[sample["doc_id"]]
        for choice, (loglik, _) in zip(row["choices"], [r[0] for r in sample["resps"]]):
            ctx, full = tok(row["prompt"]).input_ids, tok(row["prompt"] + " " + choice).input_ids
            req = lf.requests("large-qa", full, SamplingParams(max_tokens=0, prompt_logprobs=True))[0]
            scores = next(ev for ev in lf.stream([req]) if hasattr(ev, "tokens"))
            assert loglik == pytest.approx(sum(scores.logprobs[len(ctx):]), abs=1e-4)
