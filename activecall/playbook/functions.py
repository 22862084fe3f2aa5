"""The playbook's actions as OpenAI ``tools`` and a ``response_format`` JSON schema (activecall).

Small models follow the free-text tag instructions of §7.1 unreliably.  Where the server
offers them, ``llm.toolMode`` picks a structured channel instead:

- ``tools``: each action is a function (:data:`FUNCTIONS`); the model's ``tool_calls``
  become the same :data:`~activecall.playbook.actions.Action` values the tags give
  (:func:`action_from_call`), while its text streams as speech.
- ``json``: the reply must match :data:`REPLY_SCHEMA` (the §7.2 shape) through
  ``response_format`` ``json_schema``; servers with grammar-constrained decoding
  (llama.cpp, vLLM, Ollama) then cannot produce anything else.

Pure module: stdlib only.
"""

from __future__ import annotations

import json
from typing import Any

from activecall.playbook.actions import (
    Action, Collect, Goto, Hangup, HttpTool, Message, Play, Refer, ReplyFormatError, SetVar,
)

TOOL_MODES = ("tags", "tools", "json")
MAX_ARGUMENTS_CHARS = 16384


def _function(name: str, description: str, properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(required),
                       "additionalProperties": False}}}


_STR = {"type": "string"}

#: The ``tools`` of every request in ``tools`` mode.
FUNCTIONS: tuple[dict[str, Any], ...] = (
    _function("hangup", "End the call after what you are saying now has been spoken.",
              {"reason": _STR}),
    _function("transfer", "Transfer the caller to a person or another number (a SIP URI).",
              {"target": _STR}, ("target",)),
    _function("goto_scene", "Switch to another scene of the script.", {"scene": _STR}, ("scene",)),
    _function("set_var", "Remember a value for later (a call variable).", {"key": _STR, "value": _STR},
              ("key", "value")),
    _function("collect_digits", "Ask the caller to type digits on the keypad with a configured collector.",
              {"type": _STR, "var": _STR, "prompt": _STR}, ("type", "var")),
    _function("http_request", "Call an HTTP API; its answer comes back to you.",
              {"url": _STR, "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]},
               "body": {"type": "object"}}, ("url",)),
    _function("play_audio", "Play an audio file or URL to the caller.", {"file": _STR}, ("file",)),
    _function("send_message", "Send a text message to the caller's phone system (SIP MESSAGE).",
              {"body": _STR}, ("body",)),
)

#: ``response_format`` of ``json`` mode: §7.2's shape.
REPLY_SCHEMA: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "agent_reply",
        "strict": False,
        "schema": {
            "type": "object",
            "properties": {
                "text": {"type": "string", "description": "What to say to the caller."},
                "waitInputTimeout": {"type": "integer", "minimum": 0},
                "tools": {"type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": ["hangup", "refer", "http", "rag", "accept", "reject"]},
                        "reason": _STR, "initiator": _STR, "caller": _STR, "callee": _STR,
                        "url": _STR, "method": _STR, "body": {}, "headers": {"type": "object"},
                        "query": _STR, "options": {"type": "object"},
                    },
                    "required": ["name"],
                }},
            },
            "required": ["text"],
        },
    },
}


def _args(arguments_json: str, name: str) -> dict[str, Any]:
    if len(arguments_json) > MAX_ARGUMENTS_CHARS:
        raise ReplyFormatError(f"{name}: arguments longer than {MAX_ARGUMENTS_CHARS} characters")
    try:
        args = json.loads(arguments_json or "{}")
    except (ValueError, RecursionError) as e:
        raise ReplyFormatError(f"{name}: arguments are not JSON: {e}") from None
    if not isinstance(args, dict):
        raise ReplyFormatError(f"{name}: arguments must be an object")
    return args


def _str(args: dict[str, Any], key: str, name: str, required: bool = True) -> str | None:
    value = args.get(key)
    if value is None or value == "":
        if required:
            raise ReplyFormatError(f"{name}: {key} is required")
        return None
    if not isinstance(value, str):
        raise ReplyFormatError(f"{name}: {key} must be a string")
    return value


def action_from_call(name: str, arguments_json: str) -> Action:
    """The action of one tool call; :class:`ReplyFormatError` names what is wrong."""
    args = _args(arguments_json, name)
    if name == "hangup":
        return Hangup(_str(args, "reason", name, required=False))
    if name == "transfer":
        return Refer(str(_str(args, "target", name)))
    if name == "goto_scene":
        return Goto(str(_str(args, "scene", name)))
    if name == "set_var":
        return SetVar(str(_str(args, "key", name)), str(_str(args, "value", name)))
    if name == "collect_digits":
        return Collect(str(_str(args, "type", name)), str(_str(args, "var", name)), _str(args, "prompt", name, False))
    if name == "http_request":
        return HttpTool(str(_str(args, "url", name)), (_str(args, "method", name, False) or "GET").upper(),
                        args.get("body"))
    if name == "play_audio":
        return Play(str(_str(args, "file", name)))
    if name == "send_message":
        return Message(str(_str(args, "body", name)))
    raise ReplyFormatError(f"unknown function {name[:64]!r}")
