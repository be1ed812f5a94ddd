"""Tiny random Llama models and a BPE tokenizer, built locally for tests (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
WORDS = ("the a of to and in is was for on with as by at from that this it be are one two three four five six "
         "seven eight nine ten red green blue city river king queen capital founder colour number question answer "
         "what who which where when how many big small old new first last north south east west").split()


def corpus() -> list[str]:
    rng = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        idx = torch.randint(len(WORDS), (12,), generator=rng).tolist()
        lines.append(" ".join(WORDS[i] for i in idx) + " .")
    return lines


def build_tokenizer(vocab_size: int = 300, extra: list[str] | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"] + (extra or [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int, hidden: int = 32, layers: int = 2, vocab: int | None = None,
                scale: float = 1.0, classifier: bool = False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    if classifier:
        cfg.num_labels = 1
        model = LlamaForSequenceClassification(cfg)
    else:
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # sharper distributions so fusion differences are visible
            model.lm_head.weight.mul_(scale)
    return model.eval()


def save(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_family(root: Path) -> dict[str, Path]:
    """base-large, base-small, tuned-a, tuned-b, reward, and a model with a padded vocabulary tail."""
    tok = build_tokenizer()
    out = {
        "base-large": save(build_model(tok, 1, hidden=48, layers=3, scale=8.0), tok, root / "base-large"),
        "base-small": save(build_model(tok, 2, scale=8.0), tok, root / "base-small"),
        "tuned-a": save(build_model(tok, 3, scale=8.0), tok, root / "tuned-a"),
        "tuned-b": save(build_model(tok, 4, scale=8.0), tok, root / "tuned-b"),
        "padded": save(build_model(tok, 5, vocab=len(tok) + 13, scale=8.0), tok, root / "padded"),
        "reward": save(build_model(tok, 6, classifier=True), tok, root / "reward"),
    }
    other = build_tokenizer(vocab_size=280, extra=["<extra>"])
    out["foreign"] = save(build_model(other, 7), other, root / "foreign")
    out["foreign-small"] = save(build_model(other, 8, scale=8.0), other, root / "foreign-small")
    return out


# A registry over build_family's folders (str.format with the folder of each name).
TINY_CONFIG = """
models:
  base-large: {{path: {base-large}, dtype: float32, chat_template: true}}
  base-small: {{path: {base-small}, dtype: float32, chat_template: true}}
  tuned-a: {{path: {tuned-a}, dtype: float32, chat_template: true}}
  tuned-b: {{path: {tuned-b}, dtype: float32, chat_template: true}}
  padded: {{path: {padded}, dtype: float32}}
  foreign: {{path: {foreign}, dtype: float32}}
  foreign-small: {{path: {foreign-small}, dtype: float32}}
rewards:
  rm: {{path: {reward}, dtype: float32}}
experts:
  a: {{tuned: tuned-a, untuned: base-small}}
  b: {{tuned: tuned-b, untuned: base-small}}
  pad: {{tuned: padded, untuned: base-small}}
  alien: {{tuned: foreign, untuned: base-small}}
  xa: {{tuned: foreign, untuned: foreign-small, cross_tokenizer: true}}
ensembles:
  proxy-a: {{base: base-large, method: proxy, experts: [a], alpha: 1.0}}
  eft-ab: {{base: base-large, method: eft, experts: [a, b], weights: [0.5, 0.5], beta: 1.0}}
  dlf-ab: {{base: base-large, method: dlf, experts: [a, b]}}
  tq: {{base: base-large, method: tqstar, baseline: tuned-a, reward: rm, top_k: 4, rollout_tokens: 3}}
server: {{memory_budget_mb: 512, max_batch: 16}}
"""
