"""Parsing JSON that arrives from the network: bounded nesting, one exception type."""

from __future__ import annotations

import json

# Deep enough for any command (tool schemas included), shallow enough that
# re-serializing a command or a /list entry can never exhaust the stack.
MAX_JSON_DEPTH = 64


class JsonInputError(ValueError):
    """The text is not JSON we accept; ``message`` says why, for an ``error`` event or an HTTP 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parse_json(data: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> object:
    """Decode ``data``; raises :class:`JsonInputError` for invalid or too deeply nested JSON."""
    too_deep = f"invalid JSON: nested deeper than {max_depth} levels"
    try:
        value = json.loads(data)
    except RecursionError:
        raise JsonInputError(too_deep) from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise JsonInputError(f"invalid JSON: {e}") from None
    if _deeper_than(value, max_depth):
        raise JsonInputError(too_deep)
    return value


def _deeper_than(value: object, limit: int) -> bool:
    # Iterative, so that checking depth cannot itself recurse too deep.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
