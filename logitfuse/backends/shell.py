"""A model whose forwards run elsewhere: its tokenizer, context window and vocabulary, no weights.

logitfuse serve's engine mode hosts a registry model (`engine: vllm`) in an in-process vLLM engine, whose
logits processor runs the experts (logitfuse/vllm/). The service itself never runs a forward of those
models; it needs what builds and checks their requests: each role's prompt ids (its tokenizer and chat
template setting), how many tokens fit (`max_context`), the width of its scores and its end ids. A ShellLM
is that, read from the checkpoint's tokenizer and config files. Its forwards raise.
"""

from __future__ import annotations

import torch

from logitfuse.backends.base import Tokenizer, tokenizer_vocab_info
from logitfuse.backends.tokenizers import TokenizerStore
from logitfuse.ops.vocab import VocabInfo


class ShellLM:
    can_score_prompt = False
    remote = False
    can_verify_blocks = False

    def __init__(self, name: str, tokenizer: Tokenizer, max_context: int, logits_width: int,
                 chat_template: bool = False) -> None:
        self.name, self.tokenizer = name, tokenizer
        self.device = torch.device("cpu")
        self.max_context, self.logits_width, self.chat_template = max_context, logits_width, chat_template

    @classmethod
    def load(cls, name: str, path: str, chat_template: bool = False, gguf_file: str | None = None,
             max_context: int | None = None, tokenizers: TokenizerStore | None = None) -> ShellLM:
        """From a checkpoint folder's config and tokenizer files (max_context: the engine's own limit, where
        it sets one; else the config's max_position_embeddings)."""
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
        text = cfg.get_text_config()
        context = max_context or int(getattr(text, "max_position_embeddings", None) or 2048)
        tok = (tokenizers or TokenizerStore()).get(path, gguf_file)
        return cls(name, tok, context, int(text.vocab_size), chat_template)

    def vocab_info(self, with_texts: bool = False) -> VocabInfo:
        return tokenizer_vocab_info(self.name, self.tokenizer, self.logits_width, with_texts)

    def param_bytes(self) -> int:
        return 0  # the weights live in the engine that runs the model

    def kv_bytes_per_token(self) -> int:
        return 0

    def _elsewhere(self, *_args, **_kwargs):
        raise RuntimeError(f"model {self.name!r} runs in another engine (engine: vllm): no forward here")

    prefill = decode = select = concat = forget_last = rows = _elsewhere
