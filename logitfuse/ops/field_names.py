"""Unknown keys in a request or a config: the known field a misspelt key most likely meant.

Pure: names in, a name or an error out. A key is a near-miss of a known field when it is that field up to
case and separators (`maxTokens`, `top-k`), a close spelling (difflib's ratio of at least 0.8: `fusoin`,
`stop_token_id`, `logprob`), or that field with a suffix (`fusion_params`, `fusion_config`).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

CUTOFF = 0.8  # difflib ratio: 0.83 for fusoin/fusion, 0.93 for logprob/logprobs; 0.5 for store/stop
SUFFIX_MIN = 5  # `fusion_x` names fusion; `user_id` is not taken for `user`


def _plain(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def near_miss(key: str, known: Iterable[str]) -> str | None:
    """The known field `key` most likely misspells, or None when it resembles none of them."""
    known = [k for k in known if k != key]
    for k in known:
        if _plain(k) == _plain(key):
            return k
    close = difflib.get_close_matches(key, known, n=1, cutoff=CUTOFF)
    if close:
        return close[0]
    prefixed = [k for k in known if len(k) >= SUFFIX_MIN and key.lower().startswith(k.lower() + "_")]
    return max(prefixed, key=len) if prefixed else None


def unknown_field(key: str, known: Collection[str], listing: bool) -> PydanticCustomError:
    """The validation error for an unknown key: names it, the field it resembles, and (for closed objects)
    every known field. Its ctx carries the key so that messages can give the full path."""
    guess = near_miss(key, known)
    hint = f"; did you mean {guess!r}?" if guess else ""
    known_part = f" (known: {', '.join(known)})" if listing else ""
    return PydanticCustomError("unknown_field", "unknown field {name}{hint}{known_part}",
                               {"field": key, "name": repr(key), "hint": hint, "known_part": known_part})


def error_path(error: dict) -> str:
    """The dotted path of one pydantic error, ending at the unknown key for unknown_field errors."""
    parts = [str(p) for p in error.get("loc", ())]
    if error.get("type") == "unknown_field":
        parts.append(error["ctx"]["field"])
    return ".".join(parts)


def reject_unknown(data: object, known: Collection[str]) -> object:
    """For closed objects (config entries, the `fusion` extension): any key outside `known` is an error."""
    if isinstance(data, dict):
        for key in data:
            if isinstance(key, str) and key not in known:
                raise unknown_field(key, known, listing=True)
    return data


def ignored_fields(data: object, known: Collection[str], tolerated: Collection[str]) -> list[str]:
    """For open objects (OpenAI requests, which tolerate unknown fields): raise on the first unknown key that is
    a near-miss of a known field the body does not also set; return the other unknown keys, to be ignored."""
    if not isinstance(data, dict):
        return []
    unknown = [k for k in data if isinstance(k, str) and k not in known]
    unset = [k for k in known if k not in data]
    for key in unknown:
        if key not in tolerated and near_miss(key, unset):
            raise unknown_field(key, unset, listing=False)
    return unknown


class ClosedModel(BaseModel):
    """A frozen schema whose unknown keys are errors naming the key, the field it resembles and every field
    (registry entries, a request's `fusion` object)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object) -> object:
        return reject_unknown(data, list(cls.model_fields))
