"""The options of `logitfuse train-family` (kept apart from the trainer so that `--help` loads no torch)."""

from __future__ import annotations

import argparse

DESCRIPTION = ("Train the miniature model family (a made-up world, one tokenizer, base, tuned and reward models) "
               "on the CPU with fixed seeds; the run is bit-for-bit reproducible.")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="models", help="folder the models are written to")
    ap.add_argument("--seed", type=int, default=0, help="seed of the world, the corpus and every training run")
    ap.add_argument("--large-steps", type=int, default=650, help="pretraining steps of base-large")
    ap.add_argument("--small-steps", type=int, default=400, help="pretraining steps of base-small")
