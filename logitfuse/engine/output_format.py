"""A request's structured-output fields as one StructuredSpec: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

Pure parsing (the grammar is compiled at admission: engine/grammar.py); a malformed value is an
InvalidRequest naming its field. At most one constraint per request. vLLM's two JSON options of
`structured_outputs` are applied to the schema itself: `disable_additional_properties` closes every object
that lists its properties and says nothing of others (`additionalProperties: false`, as vLLM's guidance
backend does), `disable_any_whitespace` lays JSON out with no whitespace at all.
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
# keys that change JSON output: implemented (below); and keys that choose among grammar engines (there is one)
STRUCTURED_OPTIONS = ("disable_any_whitespace", "disable_additional_properties")
STRUCTURED_NEUTRAL = ("disable_fallback", "backend")
# vLLM's older per-request spelling of those options: guided_decoding_backend "xgrammar:disable-any-whitespace"
BACKEND_OPTIONS = {"disable-any-whitespace": "disable_any_whitespace",
                   "no-additional-properties": "disable_additional_properties", "no-fallback": None}
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}  # llguidance's layout
# where a JSON schema holds subschemas: maps of them, and single ones or lists of them
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("items", "prefixItems", "additionalItems", "contains", "allOf", "anyOf", "oneOf", "not", "if",
               "then", "else", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames")


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


def closed(schema: Any) -> Any:
    """A copy of a JSON schema where every object schema that lists properties (or property patterns) and says
    nothing of additionalProperties forbids other keys, at every depth (vLLM's disable_additional_properties)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: {n: closed(s) for n, s in v.items()} if k in _SCHEMA_MAPS and isinstance(v, dict)
           else closed(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    if "additionalProperties" not in out and any(isinstance(out.get(k), dict)
                                                 for k in ("properties", "patternProperties")):
        out["additionalProperties"] = False
    return out


def _options(value: dict) -> dict[str, bool]:
    """structured_outputs' JSON options, each true or false (null: false)."""
    out = {}
    for key in STRUCTURED_OPTIONS:
        v = value.get(key)
        if v is not None and not isinstance(v, bool):
            raise InvalidRequest(f"structured_outputs.{key} must be true or false, got {v!r}",
                                 f"structured_outputs.{key}")
        out[key] = bool(v)
    return out


def backend_options(value: Any) -> dict[str, bool]:
    """The JSON options of a guided_decoding_backend string (`name` or `name:option,option`)."""
    out = dict.fromkeys(STRUCTURED_OPTIONS, False)
    if value is None:
        return out
    if not isinstance(value, str):
        raise InvalidRequest(f"guided_decoding_backend must be a string, got {value!r}", "guided_decoding_backend")
    for option in filter(None, (o.strip() for o in value.partition(":")[2].split(","))):
        if option not in BACKEND_OPTIONS:
            raise InvalidRequest(f"guided_decoding_backend: unknown option {option!r} (known: "
                                 f"{', '.join(BACKEND_OPTIONS)})", "guided_decoding_backend")
        if key := BACKEND_OPTIONS[option]:
            out[key] = True
    return out


def _with_options(spec: StructuredSpec, options: dict[str, bool]) -> StructuredSpec:
    """A JSON spec with structured_outputs' options applied to its schema (other kinds: as they are)."""
    if spec.kind not in ("json", "json_object") or not any(options.values()):
        return spec
    schema = json.loads(spec.spec) if spec.kind == "json" else {"type": "object"}
    if options["disable_additional_properties"]:
        schema = closed(schema)
    if options["disable_any_whitespace"]:  # the schema's own layout, if it gives one, still wins
        schema = {**schema, "x-guidance": {**COMPACT, **(schema.get("x-guidance") or {})}}
    return StructuredSpec("json", json.dumps(schema, sort_keys=True, separators=(",", ":")), spec.field)


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
        if key not in STRUCTURED_KEYS + STRUCTURED_REFUSED + STRUCTURED_OPTIONS + STRUCTURED_NEUTRAL:
            raise InvalidRequest(f"structured_outputs: unknown field {key!r} (known: "
                                 f"{', '.join(STRUCTURED_KEYS)})", f"structured_outputs.{key}")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise InvalidRequest(f"structured_outputs must give exactly one of {', '.join(STRUCTURED_KEYS)} (got "
                             f"{', '.join(given) or 'nothing'})", "structured_outputs")
    return _with_options(_spec(given[0], value[given[0]], f"structured_outputs.{given[0]}"), _options(value))


def structured_spec(fields: dict[str, Any]) -> StructuredSpec | None:
    """The one constraint among a request's fields (response_format, structured_outputs, guided_*), or None,
    with the JSON options of guided_decoding_backend applied."""
    specs = []
    if (s := from_response_format(fields.get("response_format"))) is not None:
        specs.append(s)
    if (s := from_structured_outputs(fields.get("structured_outputs"))) is not None:
        specs.append(s)
    specs += [_spec(kind, fields[name], name) for name, kind in GUIDED.items() if fields.get(name) is not None]
    if len(specs) > 1:
        raise InvalidRequest(f"give one structured-output constraint, got {len(specs)} ("
                             f"{', '.join(s.field for s in specs)})", specs[1].field)
    return _with_options(specs[0], backend_options(fields.get("guided_decoding_backend"))) if specs else None
