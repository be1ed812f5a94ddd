"""The processor's start-up checks (no engine started): which ensembles it serves, and a base whose vocabulary
is not vLLM's refused with the first differing token named."""

from dataclasses import replace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")

from logitfuse.backends.hf import probe_vocab
from logitfuse.vllm.processor import refusals
from tests.vllm.conftest import MODELS


@pytest.fixture(scope="module")
def vllm_vocab():
    return probe_vocab("vllm", str(MODELS / "base-large"))


def test_every_ensemble_that_can_run_is_served(ref, vllm_vocab, monkeypatch):
    monkeypatch.delenv("LOGITFUSE_ENSEMBLES", raising=False)
    refused = refusals(ref.registry, vllm_vocab, ref)
    assert set(refused) == {"spec", "tq", "formats", "unloadable"}
    assert "speculative" in refused["spec"] and "rollouts" in refused["tq"]
    assert "model 'broken-small' could not be loaded" in refused["unloadable"]


def test_a_base_with_another_vocabulary_is_refused(ref, vllm_vocab, monkeypatch):
    """vLLM's model has two token ids swapped: every ensemble's base differs, so the processor refuses to start,
    naming the first differing id; naming one ensemble makes its refusal the start-up error."""
    vocab = dict(vllm_vocab.vocab)
    a, b = [t for t, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = replace(vllm_vocab, vocab=vocab)
    monkeypatch.delenv("LOGITFUSE_ENSEMBLES", raising=False)
    with pytest.raises(ValueError, match=r"no ensemble can be fused with vLLM's model .*proxy: its base "
                                         r"'base-large' does not share vLLM's vocabulary: .*token id 100"):
        refusals(ref.registry, other, ref)
    monkeypatch.setenv("LOGITFUSE_ENSEMBLES", "proxy,dlf")
    with pytest.raises(ValueError, match="these ensembles cannot be served: proxy: its base"):
        refusals(ref.registry, other, ref)


def test_named_ensembles_must_exist_and_run(ref, vllm_vocab, monkeypatch):
    monkeypatch.setenv("LOGITFUSE_ENSEMBLES", "proxy,missing")
    with pytest.raises(ValueError, match=r"names unknown ensembles \['missing'\]"):
        refusals(ref.registry, vllm_vocab, ref)
    monkeypatch.setenv("LOGITFUSE_ENSEMBLES", "proxy,tq")
    with pytest.raises(ValueError, match="these ensembles cannot be served: tq: method 'tqstar'"):
        refusals(ref.registry, vllm_vocab, ref)
    monkeypatch.setenv("LOGITFUSE_ENSEMBLES", "proxy,dlf")
    refused = refusals(ref.registry, vllm_vocab, ref)
    assert "proxy" not in refused and "dlf" not in refused and "not served here" in refused["eft"]
