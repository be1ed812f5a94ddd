"""Structured outputs: a request's grammar compiled once per (tokenizer, vocabulary width, grammar) with
llguidance, and one matcher per sequence that gives the next token's mask and advances with each token.

llguidance is an optional extra (`pip install logitfuse[structured]`) and is imported here only, when a
request asks for structured output. It was picked over xgrammar because its wheel brings nothing else
(xgrammar's pulls triton), and it computes a mask in tens of microseconds on the CPU.

A tokenizer is described to llguidance by its tokens' bytes: the serialized tokenizer where llguidance reads
it (byte-level BPE), else each token's piece with SentencePiece's word marker as a space and `<0xAB>` byte
tokens as their byte (Metaspace BPE, as the miniature family uses). Special tokens never match text.

A dead end is a grammar that needs next what no token of the vocabulary can produce (JSON's `{` on a
vocabulary without it). llguidance then allows no token, or, where the bytes it forces cannot be tokenized at
all, computes the mask as if they had been taken, allowing tokens that the matcher refuses: a first mask is
checked against the matcher at admission (check_start), and a row that reaches a dead end later ends with a
GrammarDeadEnd naming the bytes it needed (dead_end), never with a token the grammar does not take.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

from logitfuse.engine.request import StructuredSpec
from logitfuse.errors import InvalidRequest

EXTRA = "structured"  # pip install logitfuse[structured]
CACHE_SIZE = 256  # compiled grammars kept per tokenizer (least recently used dropped)
# JSON's layout: one space after `,` and `:`, no other whitespace (a schema's "x-guidance" may change it); free
# whitespace lets a sampled model wander in blanks until max_tokens cuts the object short
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
PARALLEL_FROM = 4  # matchers in one step from which their masks are computed on llguidance's threads
CHECKED = 8  # allowed tokens of a first mask tried on the matcher (a mask past unspellable bytes fails them all)
_pool: Any = None  # llguidance.LLExecutor, made on first use
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_lock = threading.Lock()
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> {width: LLTokenizer}
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> OrderedDict of templates


class GrammarDeadEnd(InvalidRequest):
    """The grammar needs next what no token of the vocabulary can produce: the request's fault (a 400 naming
    the field at admission, the row's error event later)."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise InvalidRequest(f"structured outputs need the grammar engine: pip install 'logitfuse[{EXTRA}]' "
                             "(llguidance)", "response_format") from None
    return llguidance


def _token_bytes(tokenizer: Any, i: int) -> bytes:
    piece = tokenizer.convert_ids_to_tokens(i) or ""
    if m := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


class _Pieces:
    """What llguidance's TokenizerWrapper reads from a tokenizer: token bytes, specials, and an encoder that
    agrees with those bytes (greedy longest match: the tokenizer's own encode would add SentencePiece's
    leading space, which the grammar engine would then take for text)."""

    def __init__(self, tokenizer: Any, width: int) -> None:
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = [i for i in tokenizer.all_special_ids if i < width]
        self.tokens = [_token_bytes(tokenizer, i) if i < len(tokenizer) else b"" for i in range(width)]
        special = set(self.special_token_ids)
        self._ids = {t: i for i, t in reversed(list(enumerate(self.tokens))) if t and i not in special}
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                if (tok := self._ids.get(data[i:i + n])) is not None:
                    out.append(tok)
                    i += n
                    break
            else:
                return out  # a byte no token spells: what precedes it
        return out


def ll_tokenizer(tokenizer: Any, width: int) -> Any:
    """llguidance's view of a tokenizer over `width` token ids (the fused vocabulary), built once."""
    llg = _llguidance()
    with _lock:
        per = _tokenizers.setdefault(tokenizer, {})
        if width not in per:
            try:
                serial = tokenizer.backend_tokenizer.to_str()
                per[width] = llg.LLTokenizer(serial, n_vocab=width, eos_token=tokenizer.eos_token_id)
            except (AttributeError, ValueError):  # not a fast tokenizer, or a decoder llguidance cannot read
                per[width] = llg.LLTokenizer(llg.TokenizerWrapper(_Pieces(tokenizer, width)), n_vocab=width,
                                             eos_token=tokenizer.eos_token_id)
        return per[width]


def grammar_text(spec: StructuredSpec) -> str:
    """The llguidance grammar of a spec (raises ValueError on a malformed one)."""
    llg = _llguidance()
    m = llg.LLMatcher
    if spec.kind == "json":
        return m.grammar_from_json_schema(spec.spec, defaults=JSON_LAYOUT)
    if spec.kind == "json_object":
        return m.grammar_from_json_schema('{"type": "object"}', defaults=JSON_LAYOUT)
    if spec.kind == "regex":
        return m.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        choices = json.loads(spec.spec)
        return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    return llg.grammar_from("grammar", spec.spec)  # Lark, or GBNF converted to Lark


def compile_spec(spec: StructuredSpec, tokenizer: Any, width: int) -> Any:
    """A fresh matcher for one sequence, from the grammar compiled once per (tokenizer, width, spec);
    raises InvalidRequest naming the field and the reason when the grammar does not compile."""
    llg = _llguidance()
    key = (width, spec.kind, spec.spec)
    with _lock:
        cache = _compiled.setdefault(tokenizer, OrderedDict())
        template = cache.get(key)
        if template is not None:
            cache.move_to_end(key)
    if template is None:
        lt = ll_tokenizer(tokenizer, width)
        try:
            template = llg.LLMatcher(lt, grammar_text(spec), log_level=0)
        except Exception as err:  # a malformed schema or grammar
            raise InvalidRequest(f"{spec.field}: cannot be compiled: {err}", spec.field) from None
        if template.is_error():
            raise InvalidRequest(f"{spec.field}: cannot be compiled: {template.get_error().strip()}",
                                 spec.field)
        with _lock:
            cache[key] = template
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
    return template.deep_copy()


def cached(tokenizer: Any) -> int:
    """How many compiled grammars are kept for this tokenizer."""
    return len(_compiled.get(tokenizer, ()))


def next_mask(matcher: Any) -> torch.Tensor:
    """The matcher's packed mask of allowed next tokens, (W,) int32 (ops.penalties.bitmask_to_bool). Where
    no token can continue the text (the vocabulary cannot spell what the grammar needs next), llguidance
    enters an error state and allows only the end token: that is no token here, never a cut-off output."""
    words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
    return torch.zeros_like(words) if matcher.is_error() else words


def masks(matchers: list, width: int) -> torch.Tensor:
    """next_mask of several matchers, written straight into one (n, W) int32 tensor; from PARALLEL_FROM
    matchers on, by llguidance's thread pool (it releases the GIL)."""
    words = torch.empty(len(matchers), (width + 31) // 32, dtype=torch.int32)
    row_bytes = words.shape[1] * 4
    if len(matchers) >= PARALLEL_FROM:
        _executor().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], words.data_ptr(), row_bytes,
                                            len(matchers))
    else:
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(words[i].data_ptr(), row_bytes)
    for i, m in enumerate(matchers):
        if m.is_error():
            words[i] = 0
    return words


def _executor() -> Any:
    global _pool
    if _pool is None:
        _pool = _llguidance().LLExecutor()
    return _pool


def advance(matcher: Any, token: int) -> bool:
    """Take a sampled token; False when the matcher refuses it (it then is in an error state: a dead end)."""
    return bool(matcher.consume_token(token))


def _text(data: bytes) -> str:
    return repr(data.decode("utf-8", "replace"))


def _first_allowed(words: torch.Tensor, n: int) -> list[int]:
    """The first n token ids a packed mask (W,) int32 allows (bit j of word w: token 32 w + j)."""
    out: list[int] = []
    for w in words.nonzero().flatten()[:n].tolist():
        bits = int(words[w]) & 0xFFFFFFFF
        out += [32 * w + j for j in range(32) if bits >> j & 1]
    return out[:n]


def check_start(spec: StructuredSpec, tokenizer: Any, width: int, model: str) -> None:
    """Raise GrammarDeadEnd, naming the field, when no token of `model`'s vocabulary can start text that the
    grammar admits: its first mask allows nothing, or only tokens the matcher refuses, and it does not accept
    the empty text."""
    m = compile_spec(spec, tokenizer, width)
    forced = m.compute_ff_bytes()
    if m.is_accepting():
        return
    if any(m.validate_tokens([t]) for t in _first_allowed(next_mask(m), CHECKED)):
        return
    need = f"the grammar must start with {_text(forced)}" if forced else "the grammar's first characters"
    raise GrammarDeadEnd(f"{spec.field}: {need}, which no token of {model}'s vocabulary can produce "
                         "(the vocabulary cannot spell it)", spec.field)


def dead_end(spec: StructuredSpec, tokenizer: Any, width: int, tokens: list[int]) -> GrammarDeadEnd:
    """Why a row's grammar took no token after `tokens`: replayed on a fresh matcher (the row's own is in an
    error state and has lost its forced bytes), for the error that ends the row."""
    m = compile_spec(spec, tokenizer, width)
    text = tokenizer.decode(tokens) if tokens else ""
    after = f"after {len(tokens)} tokens ({text!r})"
    if not m.consume_tokens(tokens):
        return GrammarDeadEnd(f"{spec.field}: the grammar stopped {after}: {m.get_error().strip()[:200]}",
                              spec.field)
    forced = m.compute_ff_bytes()
    need = f"needs {_text(forced)} next" if forced else "allows no further characters"
    return GrammarDeadEnd(f"{spec.field}: {after} the grammar {need}, which no token of the base model's "
                          "vocabulary can produce (the vocabulary cannot spell it)", spec.field)
