"""Dynamic logit fusion with a cross-tokenizer expert, against a float64 reference written out here.

Definition (docs/algorithms.md): the expert's tuned and untuned log-probabilities (in its own vocabulary) are
mapped onto the base's vocabulary by token text (unmapped base tokens get 0 in both, so they are not steered);
the KL targets KL(Q_t || Q) and KL(Q || Q_t) are computed in the expert's own vocabulary, where its distributions are
whole; the weight a minimises (KL(P~(a) || P) - KL(Q_t || Q))^2 + (KL(P || P~(a)) - KL(Q || Q_t))^2 over the
grid, with P = softmax(z_L) and P~(a) = softmax(z_L + a (log Q_t - log Q)) on the mapped log-probabilities."""

import numpy as np
import pytest

from logitfuse import SamplingParams
from logitfuse.methods.dlf import GRID
from logitfuse.ops.weights import make_grid

PROMPTS = ["the red city of the north", "king queen river blue green"]


def log_softmax(z: np.ndarray) -> np.ndarray:
    finite = np.isfinite(z)
    m = z[finite].max()
    out = np.full_like(z, -np.inf)
    out[finite] = z[finite] - m - np.log(np.exp(z[finite] - m).sum())
    return out


def kl(lp: np.ndarray, lq: np.ndarray) -> float:
    p = np.exp(lp)
    keep = p > 0
    return float((p[keep] * (lp[keep] - lq[keep])).sum())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_dlf_across_tokenizers_equals_the_float64_reference(lf, prompt):
    fusion = {"method": "dlf", "experts": ["xa"]}
    req = lf.requests("base-large", prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=5), fusion)[0]
    ev = next(e for e in lf.stream([req]) if e.token_id is not None)
    al = lf.alignment(req.plan)
    raw = {m: lf.model(m).prefill([req.prompts[m]])[1][0].double() for m in ("base-large", "foreign", "foreign-small")}
    z_l = al.apply(raw["base-large"]).numpy()
    own_t, own_s = log_softmax(raw["foreign"].numpy()), log_softmax(raw["foreign-small"].numpy())
    m = al.maps["foreign"].numpy()  # base id -> expert id (-1: none)
    z_t, z_s = (np.where(m >= 0, own[np.clip(m, 0, None)], 0.0) for own in (own_t, own_s))
    fwd_t, rev_t = kl(own_t, own_s), kl(own_s, own_t)  # in the expert's own vocabulary
    l_large = log_softmax(z_l)
    losses = []
    for a in make_grid(*GRID).tolist():
        l_fused = log_softmax(z_l + a * (z_t - z_s))
        losses.append((kl(l_fused, l_large) - fwd_t) ** 2 + (kl(l_large, l_fused) - rev_t) ** 2)
    a = make_grid(*GRID).tolist()[int(np.argmin(losses))]
    assert ev.diagnostics["dlf_weights"]["xa"] == pytest.approx(a, abs=1e-6)  # the same grid point (float32)
    want = log_softmax(z_l + a * (z_t - z_s))
    top = np.argsort(-want)[:5]
    assert [t.token_id for t in ev.top] == top.tolist()
    assert [t.logprob for t in ev.top] == pytest.approx(want[top].tolist(), abs=1e-4)
    # the targets differ from what the mapped logits would give: the definition matters here
    mapped_t, mapped_s = log_softmax(z_t), log_softmax(z_s)
    assert abs(kl(mapped_t, mapped_s) - fwd_t) > 1e-3


def test_dlf_across_tokenizers_decodes(lf):
    out = lf.generate("base-large", PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                      {"method": "dlf", "experts": ["xa"]})
    assert all(len(o.token_ids) == 6 and len(o.diagnostics) == 6 for o in out)
    assert all(0 <= d["dlf_weights"]["xa"] <= 2 for o in out for d in o.diagnostics)

