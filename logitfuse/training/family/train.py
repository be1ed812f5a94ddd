"""Train the miniature family: one shared BPE tokenizer, base-large and base-small pretrained on the world's
prose, small experts tuned on chat-formatted questions (qa, arith) and on five-sentence descriptions
(describe), tuned-large-qa as the reference for true fine-tuning, and a small reward model. CPU, fixed
seeds, a few minutes on 2 cores.

    logitfuse train-family --out models        (or: python -m logitfuse.training.family --out models)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from logitfuse.training.family import world as W
from logitfuse.training.family.options import add_args

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
SIZES = {"large": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6),
         "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)}
SEQ = 128


def build_tokenizer(corpus: list[str], words: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS, show_progress=False)
    # World words repeated so each becomes a single token; then the corpus for everything else.
    tok.train_from_iterator([" ".join(words)] * 50 + corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_prompt(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)


def config(tok, size: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       num_key_value_heads=SIZES[size]["num_attention_heads"], **SIZES[size])


def pack(tok, docs: list[str]) -> torch.Tensor:
    """All documents as one `doc </s> doc </s>` stream, cut into (N, SEQ) rows. No BOS anywhere, so text
    prompts and chat-template prompts tokenise the same way."""
    stream: list[int] = []
    for d in docs:
        stream += tok(d).input_ids + [tok.eos_token_id]
    n = len(stream) // SEQ
    return torch.tensor(stream[: n * SEQ]).view(n, SEQ)


def lr_at(step: int, total: int, peak: float, warmup: int = 30) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(tok, rows: torch.Tensor, size: str, steps: int, lr: float, seed: int, label: str) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(tok, size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=f"pretrain {label}", leave=False)
    for step in bar:
        batch = rows[torch.randint(len(rows), (32,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        _update(model, opt, loss, lr_at(step, steps, lr))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def _update(model, opt, loss, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def tuning_batch(tok, examples: list[W.Example], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted question + answer + </s>, loss on the answer tokens only (labels -100 elsewhere)."""
    seqs, labels = [], []
    for i in idx:
        ex = examples[i]
        p = tok(chat_prompt(tok, ex.question)).input_ids
        full = tok(chat_prompt(tok, ex.question) + " " + ex.answer).input_ids + [tok.eos_token_id]
        seqs.append(full)
        labels.append([-100] * len(p) + full[len(p):])
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), tok.pad_token_id)
    lab = torch.full((len(seqs), n), -100)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(lb)] = torch.tensor(s), torch.tensor(lb)
    return ids, lab


def tune(model, tok, examples: list[W.Example], steps: int, lr: float, seed: int, label: str,
         replay: torch.Tensor | None = None) -> LlamaForCausalLM:
    model = model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc=f"tune {label}", leave=False):
        ids, lab = tuning_batch(tok, examples, [rng.randrange(len(examples)) for _ in range(32)])
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=lab).loss
        if replay is not None:  # keep pretraining knowledge while learning the format
            batch = replay[torch.randint(len(replay), (4,), generator=gen)]
            loss = loss + model(input_ids=batch, labels=batch).loss
        _update(model, opt, loss, lr_at(step, steps, lr, warmup=10))
    return model.eval()


def copy_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    clone = LlamaForCausalLM(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


def train_reward(small: LlamaForCausalLM, tok, world: W.World, steps: int, seed: int) -> LlamaForSequenceClassification:
    """A classifier from base-small's weights: correct answers in the tuned format score high, wrong ones low."""
    torch.manual_seed(seed)
    cfg = config(tok, "small")
    cfg.num_labels = 1
    rm = LlamaForSequenceClassification(cfg)
    rm.model.load_state_dict(small.model.state_dict())
    examples = W.qa_examples(world, world.tune_entities, held_out=False) + W.arith_examples(world.tune_pairs, False)
    values = sorted({ex.answer for ex in examples})
    rng = random.Random(seed)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    for step in tqdm(range(steps), desc="reward", leave=False):
        texts, target = [], []
        for _ in range(32):
            ex = rng.choice(examples)
            good = rng.random() < 0.5
            ans = ex.answer if good else rng.choice([v for v in values if v != ex.answer])
            texts.append(chat_prompt(tok, ex.question) + " " + ans + tok.eos_token)
            target.append(1.0 if good else 0.0)
        enc = tok(texts, return_tensors="pt", padding=True)
        logits = rm(**enc).logits[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(target))
        _update(rm, opt, loss, lr_at(step, steps, 1e-3, warmup=10))
    return rm.eval()


def save(model, tok, folder: Path) -> None:
    model.half().save_pretrained(folder)
    tok.save_pretrained(folder)


def write_eval(tok, world: W.World, data: Path, seed: int) -> None:
    rng = random.Random(seed)
    qa = W.qa_examples(world, world.eval_entities, held_out=True)
    qa = rng.sample(qa, 400)
    arith = W.arith_examples(world.eval_pairs, held_out=True)
    describe = W.describe_examples(world, world.eval_entities)
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("qa", qa), ("arith", arith), ("describe", describe)):
        with open(data / f"eval_{name}.jsonl", "w") as f:
            for i, ex in enumerate(rows):
                row = {"id": f"{name}-{i}", "question": ex.question, "prompt": chat_prompt(tok, ex.question),
                       "answer": ex.answer, "new_phrasing": ex.new_phrasing}
                f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="logitfuse train-family", description="Train the miniature model family")
    add_args(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0, out = time.perf_counter(), Path(args.out)
    world = W.build_world(args.seed)
    corpus = W.pretraining_corpus(world, seed=args.seed + 1)
    tok = build_tokenizer(corpus, world.words())
    rows = pack(tok, corpus)
    large = pretrain(tok, rows, "large", args.large_steps, 2e-3, args.seed + 2, "base-large")
    small = pretrain(tok, rows, "small", args.small_steps, 3e-3, args.seed + 3, "base-small")
    qa = W.qa_examples(world, world.tune_entities, held_out=False)
    arith = W.arith_examples(world.tune_pairs, held_out=False)
    # A short tuning keeps the qa expert a change of format rather than memorised answers: proxy-tuning's
    # held-out exact match fell from 0.70 (80 steps) to 0.65 (150) and 0.56 (300).
    family = {
        "base-large": large, "base-small": small,
        "tuned-small-qa": tune(copy_model(small), tok, qa, 80, 1e-3, args.seed + 4, "tuned-small-qa"),
        "tuned-small-arith": tune(copy_model(small), tok, arith, 150, 1e-3, args.seed + 5, "tuned-small-arith"),
        "tuned-large-qa": tune(copy_model(large), tok, qa, 500, 3e-4, args.seed + 6, "tuned-large-qa", replay=rows),
        "tuned-large-arith": tune(copy_model(large), tok, arith, 400, 3e-4, args.seed + 7, "tuned-large-arith",
                                  replay=rows),
        "reward": train_reward(small, tok, world, 150, args.seed + 8),
        # Last, so that adding it left every model above unchanged. Replay keeps the small model's prose (its
        # answers restate the entity); 300 steps: the fused descriptions then take the facts from the base.
        "tuned-small-desc": tune(copy_model(small), tok, W.describe_examples(world, world.tune_entities), 300, 1e-3,
                                 args.seed + 10, "tuned-small-desc", replay=rows),
    }
    for name, model in family.items():
        save(model, tok, out / name)
    write_eval(tok, world, out / "data", args.seed + 9)
    print(f"family written to {out} in {time.perf_counter() - t0:.0f} s")
    return 0
