"""Which DLF weight search runs: exact up to a vocabulary size, the reduced one above it unless asked."""


def test_dlf_reduces_its_search_by_itself_only_at_large_vocabularies():
    from logitfuse.methods.dlf import AUTO_SUPPORT, AUTO_SUPPORT_VOCAB, search_support

    assert search_support(None, 2_000) is None and search_support(None, AUTO_SUPPORT_VOCAB) is None
    assert search_support(None, 262_144) == AUTO_SUPPORT  # Gemma-3's vocabulary: the reduced search
    assert search_support(0, 262_144) is None  # 0 asks for the exact search
    assert search_support(64, 2_000) == 64
