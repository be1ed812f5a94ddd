"""Tokenizers are read once and kept: the server reads every model's before it listens, so a model loaded later
(or again, after an eviction) parses none while other requests decode; a tokenizer whose files change is read
again."""

import os
import shutil

import transformers

from logitfuse import LogitFuse
from logitfuse.backends.tokenizers import TokenizerStore


def counting(monkeypatch) -> list[str]:
    reads: list[str] = []
    original = transformers.AutoTokenizer.from_pretrained

    def read(path, *a, **k):
        reads.append(str(path))
        return original(path, *a, **k)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", read)
    return reads


def test_models_loaded_after_the_tokenizers_were_read_parse_none(config_file, family, monkeypatch):
    reads = counting(monkeypatch)
    lf = LogitFuse(config_file)
    assert lf.read_tokenizers() == {}
    local = {str(family[n]) for n in ("base-large", "base-small", "tuned-a", "tuned-b", "padded", "foreign",
                                      "foreign-small")}
    assert set(reads) == local and len(reads) == len(local)  # each folder once
    reads.clear()
    vocab_builds = []
    original = transformers.PreTrainedTokenizerFast.get_vocab
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "get_vocab",
                        lambda self: vocab_builds.append(1) or original(self))
    for name in ("base-large", "base-small", "foreign"):
        lm = lf.model(name)
        assert lm.tokenizer.encode("the red city")  # a working tokenizer
    from logitfuse import SamplingParams

    out = lf.generate("proxy-a", ["the red city"], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(out.token_ids) >= 1
    assert reads == [] and vocab_builds == []  # nor is a 262k-entry vocabulary map built in a request's admission


def test_a_tokenizer_is_read_again_when_its_files_change(family, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(family["base-small"], folder)
    store = TokenizerStore()
    reads = counting(monkeypatch)
    first = store.get(str(folder), keep=True)  # as the server reads it before it listens
    assert store.get(str(folder)) is first and len(reads) == 1
    config = folder / "tokenizer_config.json"
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
    second = store.get(str(folder))
    assert second is not first and len(reads) == 2


def test_a_folder_whose_tokenizer_cannot_be_read_is_reported_not_raised(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    failed = TokenizerStore().read_all([(str(tmp_path / "broken"), None)])
    assert list(failed) == [str(tmp_path / "broken")]


def test_after_the_start_up_read_a_preload_reads_no_model_tokenizer_again(config_file, family, monkeypatch):
    """The server reads the tokenizers first (serve): the vocabulary probes and the loads of the preload reuse them."""
    lf = LogitFuse(config_file)
    assert lf.read_tokenizers() == {}
    reads = counting(monkeypatch)
    assert lf.preload() == {}
    assert reads == [str(family["reward"])]  # a reward model's tokenizer is its own (it sets padding on it)
