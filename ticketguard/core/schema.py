"""JSON schemas and their one checker: every JSON file ticketguard reads is input, checked before it is used."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jsonschema

from ticketguard.core.errors import InputError, shorten

MAX_JSON_DEPTH = 32
SHARE = {"type": "number", "minimum": 0, "maximum": 1}
SHA256_SCHEMA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
# JSON integers only: jsonschema's own "integer" also admits 3.0, which would then travel on as a float.
# Tuples are arrays, as json.dumps writes them: a section made in process (asdict) checks like one read back.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many({
        "integer": lambda _, value: isinstance(value, int) and not isinstance(value, bool),
        "array": lambda _, value: isinstance(value, (list, tuple)),
    }),
)



def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or JSON null."""
    return {"anyOf": [{"type": "null"}, schema]}


def check_json(data: Any, schema: Mapping[str, Any], what: str) -> None:
    """Refuse JSON data that nests deeper than MAX_JSON_DEPTH, holds a non-finite number or breaks ``schema``
    (integers must be JSON integers); the message names the first offending place."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InputError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels; it is no ticketguard file")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{what} holds the number {value}; every number must be finite")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1) for item in value)
    error = jsonschema.exceptions.best_match(_Validator(schema).iter_errors(data))
    if error is not None:
        place = ".".join(map(str, error.absolute_path)) or "the top level"
        shown = repr(error.instance)  # the message quotes the offending value, which may be huge
        message = error.message.replace(shown, shorten(shown, 40)) if len(shown) > 40 else error.message
        raise InputError(f"{what} is malformed at {place}: {shorten(message)}")
