"""A request's structured-output fields as one StructuredSpec: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

Pure parsing (the grammar is compiled at admission: engine/grammar.py); a malformed value is an
InvalidRequest naming its field. At most one constraint per request.
"""

from __future__ import annotations

import json
from typing import Any

from logitfuse.engine.request import StructuredSpec
from logitfuse.errors import InvalidRequest

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# keys of vLLM's structured_outputs object that change the output and are not implemented here
STRUCTURED_REFUSED = ("structural_tag", "whitespace_pattern")
STRUCTURED_NEUTRAL = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")


def _schema_text(value: Any, field: str) -> str:
    """A JSON schema (an object, or JSON text of one) as canonical text: one cache entry per schema."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise InvalidRequest(f"{field} must be a JSON schema: {err}", field) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be a JSON schema object, got {type(value).__name__}", field)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _spec(kind: str, value: Any, field: str) -> StructuredSpec:
    if kind == "json":
        return StructuredSpec("json", _schema_text(value, field), field)
    if kind == "json_object":
        if value is not True:
            raise InvalidRequest(f"{field} must be true when given, got {value!r}", field)
        return StructuredSpec("json_object", "", field)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequest(f"{field} must be a non-empty list of non-empty strings, got {value!r}", field)
        return StructuredSpec("choice", json.dumps(value), field)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field} must be a non-empty string, got {value!r}", field)
    return StructuredSpec(kind, value, field)


def from_response_format(value: Any) -> StructuredSpec | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema with its schema."""
    if value is None:
        return None
    if not isinstance(value, dict) or "type" not in value:
        raise InvalidRequest("response_format must be an object with a type: text, json_object or json_schema",
                             "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object", "", "response_format")
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise InvalidRequest("response_format.json_schema must be an object with a schema", "response_format")
        return _spec("json", inner["schema"], "response_format.json_schema.schema")
    raise InvalidRequest(f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
                         "response_format")


def from_structured_outputs(value: Any) -> StructuredSpec | None:
    """vLLM's structured_outputs object: exactly one of json, regex, choice, grammar, json_object."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("structured_outputs must be an object", "structured_outputs")
    for key in value:
        if key in STRUCTURED_REFUSED and value[key] is not None:
            raise InvalidRequest(f"structured_outputs.{key} is not supported", f"structured_outputs.{key}")
        if key not in STRUCTURED_KEYS + STRUCTURED_REFUSED + STRUCTURED_NEUTRAL + ("backend",):
            raise InvalidRequest(f"structured_outputs: unknown field {key!r} (known: "
                                 f"{', '.join(STRUCTURED_KEYS)})", f"structured_outputs.{key}")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise InvalidRequest(f"structured_outputs must give exactly one of {', '.join(STRUCTURED_KEYS)} (got "
                             f"{', '.join(given) or 'nothing'})", "structured_outputs")
    return _spec(given[0], value[given[0]], f"structured_outputs.{given[0]}")


def structured_spec(fields: dict[str, Any]) -> StructuredSpec | None:
    """The one constraint among a request's fields (response_format, structured_outputs, guided_*), or None."""
    specs = []
    if (s := from_response_format(fields.get("response_format"))) is not None:
        specs.append(s)
    if (s := from_structured_outputs(fields.get("structured_outputs"))) is not None:
        specs.append(s)
    specs += [_spec(kind, fields[name], name) for name, kind in GUIDED.items() if fields.get(name) is not None]
    if len(specs) > 1:
        raise InvalidRequest(f"give one structured-output constraint, got {len(specs)} ("
                             f"{', '.join(s.field for s in specs)})", specs[1].field)
    return specs[0] if specs else None
