"""`logitfuse tune-adapter`: a LoRA adapter for the short-answer task (real/qa.py), trained on CPU.

Rank-r LoRA on the attention projections (optionally of the top layers only), AdamW, loss on the answer
tokens and the stop token only, batches drawn with a fixed seed, so a run rebuilds the same adapter on the
same machine kind. With `--data known` (the knowledge-preserving mix) only the tuning questions whose answer the
untuned model already gives (its own greedy output contains it) are tuned on: the adapter learns the form on facts
the model holds, and is never pushed to state facts it lacks (which teaches it to guess). Rows are left-padded,
so the answers sit at the end and only the last positions' logits are computed (at 262k tokens the output
layer is most of the cost otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from logitfuse.training.real.qa import FACTS, QA, knows, load_facts, split, write_jsonl

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def encode(tok, qa: QA, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids ending with the stop token) as the role reads and writes them."""
    if chat:
        out = tok.apply_chat_template([{"role": "user", "content": qa.prompt}], add_generation_prompt=True,
                                      tokenize=True)
        prompt = list(out["input_ids"] if hasattr(out, "keys") else out)
        answer = tok.encode(qa.answer, add_special_tokens=False)
    else:
        prompt = list(tok(qa.prompt).input_ids)
        answer = tok.encode(" " + qa.answer, add_special_tokens=False)
    return prompt, answer + [tok.eos_token_id]


def batch_tensors(examples: list[tuple[list[int], list[int]]], pad: int):
    """Left-padded ids, mask, positions, and the answer targets of the last `keep` positions."""
    rows = [p + a for p, a in examples]
    length = max(map(len, rows))
    keep = max(len(a) for _, a in examples) + 1
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(rows), keep - 1), -100, dtype=torch.long)
    for i, ((_, a), row) in enumerate(zip(examples, rows)):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
        labels[i, keep - 1 - len(a):] = torch.tensor(a)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, labels, keep


@torch.no_grad()
def own_answers(model, tok, questions: list[QA], chat: bool, max_tokens: int = 12, batch: int = 32) -> list[str]:
    """The model's greedy output for each question, as it reads them in tuning."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for i in range(0, len(questions), batch):
        prompts = [encode(tok, qa, chat)[0] for qa in questions[i:i + batch]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=pad)
        out += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def train(model_path: str, out: Path, chat: bool, steps: int, batch: int, lr: float, rank: int, seed: int,
          top_layers: int | None = None, facts: Path = FACTS, data: str = "known") -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tuning, _ = split(load_facts(facts))
    asked = len(tuning)
    if data == "known":
        model.eval()
        own = own_answers(model, tok, tuning, chat)
        tuning = [qa for qa, text in zip(tuning, own) if knows(text, qa.answer)]
        print(f"the untuned model gives the answer to {len(tuning)} of {asked} tuning questions", flush=True)
    n_layers = model.config.get_text_config().num_hidden_layers
    layers = list(range(n_layers - top_layers, n_layers)) if top_layers else None  # backward stops below them
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM",
                        layers_to_transform=layers)
    peft = get_peft_model(model, config)
    examples = [encode(tok, qa, chat) for qa in tuning]
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * (1 - s / steps))
    rng = torch.Generator().manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    losses, start = [], time.perf_counter()
    peft.train()
    for step in range(steps):
        pick = torch.randint(len(examples), (batch,), generator=rng).tolist()
        ids, mask, positions, labels, keep = batch_tensors([examples[i] for i in pick], pad)
        logits = peft(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
        print(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    peft.peft_config["default"].base_model_name_or_path = Path(model_path).name  # no machine paths committed
    peft.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    log = {"model": Path(model_path).name, "chat_template": chat, "steps": steps, "batch": batch, "lr": lr,
           "rank": rank, "seed": seed, "targets": TARGETS, "layers": layers, "data": data,
           "tuning_questions": len(examples), "tuning_questions_asked": asked,
           "seconds": round(time.perf_counter() - start, 1), "losses": losses}
    (out / "tune_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a local model folder (e.g. models/real/smollm2-135m-instruct)")
    p.add_argument("--out", type=Path, required=True, help="folder for the adapter")
    p.add_argument("--chat-template", action="store_true", help="format prompts with the model's chat template")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="questions per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init and the batches")
    p.add_argument("--top-layers", type=int, help="adapt only the top N layers (the backward pass stops below)")
    p.add_argument("--facts", type=Path, default=FACTS, help="the facts TSV (default: %(default)s)")
    p.add_argument("--data", choices=["all", "known"], default="known",
                   help="tune on every tuning question, or only on those the untuned model already answers "
                        "(knowledge-preserving; default: %(default)s)")
    p.add_argument("--write-split", type=Path, help="also write the tuning and held-out questions (JSONL) here")


def run(args: argparse.Namespace) -> int:
    if args.write_split:
        tuning, held = split(load_facts(args.facts))
        write_jsonl(tuning, args.write_split / "tune.jsonl")
        write_jsonl(held, args.write_split / "heldout.jsonl")
    log = train(args.model, args.out, args.chat_template, args.steps, args.batch, args.lr, args.rank, args.seed,
                args.top_layers, args.facts, args.data)
    print(f"{args.out}: {log['steps']} steps in {log['seconds']} s, loss {log['losses'][0]} -> {log['losses'][-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="logitfuse tune-adapter", description=__doc__.splitlines()[0])
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
