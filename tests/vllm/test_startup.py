"""The processor's start-up checks (no engine started): which ensembles it serves, and a base whose vocabulary
is not vLLM's refused with the first differing token named."""

from dataclasses import replace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")

from logitfuse.backends.hf import probe_vocab
from logitfuse.vllm.core import host_vocab, refusals
from tests.vllm.conftest import MODELS


@pytest.fixture(scope="module")
def vllm_vocab(ref):
    """vLLM's vocabulary as the processor reads it (with token texts: the registry has a cross-tokenizer pair)."""
    from transformers import AutoTokenizer

    width = probe_vocab("vllm", str(MODELS / "base-large")).logits_width
    info = host_vocab(ref.registry, AutoTokenizer.from_pretrained(MODELS / "base-large"), width)
    assert info.texts is not None and len(info.texts) == width
    return info


def test_every_ensemble_that_can_run_is_served(ref, vllm_vocab, monkeypatch):
    monkeypatch.delenv("LOGITFUSE_ENSEMBLES", raising=False)
    refused = refusals(ref.registry, vllm_vocab, ref)
    # roles with different prompt formats run where the request carries their prompts: checked per request
    assert set(refused) == {"spec", "unloadable"}  # Transfer Q*'s baseline and reward model are loaded beside vLLM
    assert "speculative" in refused["spec"]
    assert "model 'broken-small' could not be loaded" in refused["unloadable"]
    assert not {"cross-proxy", "cross-eft", "cross-dlf"} & set(refused)  # their pair is loaded and mapped


def test_a_cross_tokenizer_pair_needs_the_base_texts(ref, vllm_vocab, monkeypatch):
    """Without vLLM's token texts the pair's scores cannot be mapped: its ensembles are refused, the others run."""
    monkeypatch.delenv("LOGITFUSE_ENSEMBLES", raising=False)
    refused = refusals(ref.registry, replace(vllm_vocab, texts=None), ref)
    assert set(refused) == {"spec", "unloadable", "cross-proxy", "cross-eft", "cross-dlf"}
    assert "needs its token texts" in refused["cross-dlf"]


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
    monkeypatch.setenv("LOGITFUSE_ENSEMBLES", "proxy,spec")
    with pytest.raises(ValueError, match="these ensembles cannot be served: spec: speculative fusion"):
        refusals(ref.registry, vllm_vocab, ref)
    monkeypatch.setenv("LOGITFUSE_ENSEMBLES", "proxy,dlf")
    refused = refusals(ref.registry, vllm_vocab, ref)
    assert "proxy" not in refused and "dlf" not in refused and "not served here" in refused["eft"]
