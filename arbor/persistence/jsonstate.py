"""Checks that agent state fits in a JSON (and PostgreSQL jsonb) checkpoint, and encodes it."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from arbor.errors import StateNotSerializable

_SURROGATE = re.compile("[\ud800-\udfff]")


def encode_state(agent: str, state: Any, root: str = "state") -> str:
    """Validate ``state`` and return it as JSON text.

    Raises:
        StateNotSerializable: a value is NaN or infinite, bytes, a string or key containing
            U+0000 or a surrogate code point (jsonb cannot store either as given), a dict
            with a non-string key, a reference cycle, or any other non-JSON type. The error
            names the key path, such as ``state['a'][2]``.
    """
    _check(agent, state, root, set())
    return json.dumps(state, allow_nan=False, separators=(",", ":"))


# Python raises when it turns an int of more than 4,300 digits into text (see
# sys.set_int_max_str_digits), so json.dumps would fail. This many bits stays below that.
_MAX_INT_BITS = 14_000


def _check(agent: str, value: Any, path: str, active: set[int]) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            raise StateNotSerializable(
                agent, path, "the integer has over 4,000 digits; store it as a string"
            )
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StateNotSerializable(agent, path, f"{value!r} is not a finite number")
        return
    if isinstance(value, str):
        _check_text(agent, value, path, "the string")
        return
    if isinstance(value, bytes | bytearray | memoryview):
        raise StateNotSerializable(
            agent, path, f"{type(value).__name__} is not JSON; store it base64-encoded"
        )
    if isinstance(value, dict | list | tuple):
        if id(value) in active:
            raise StateNotSerializable(agent, path, "the value contains itself (a reference cycle)")
        active.add(id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise StateNotSerializable(
                        agent,
                        f"{path}[{key!r}]",
                        f"the key is {type(key).__name__}; JSON object keys must be strings",
                    )
                _check_text(agent, key, f"{path}[{key!r}]", "the key")
                _check(agent, item, f"{path}[{key!r}]", active)
        else:
            for index, item in enumerate(value):
                _check(agent, item, f"{path}[{index}]", active)
        active.discard(id(value))
        return
    raise StateNotSerializable(
        agent,
        path,
        f"{type(value).__name__} is not a JSON type (dict, list, str, number, bool, None)",
    )


def _check_text(agent: str, text: str, path: str, subject: str) -> None:
    if "\x00" in text:
        raise StateNotSerializable(
            agent, path, f"{subject} contains U+0000, which PostgreSQL jsonb rejects"
        )
    # json.dumps writes a surrogate as a \uXXXX escape. jsonb rejects a lone one and joins
    # a pair into one character, so the string would not come back unchanged.
    if _SURROGATE.search(text):
        raise StateNotSerializable(
            agent,
            path,
            f"{subject} contains a surrogate code point (U+D800 to U+DFFF), which "
            "PostgreSQL jsonb cannot store unchanged",
        )


def encode_reply(value: Any) -> Any:
    """Return ``value`` if a checkpoint can store it as an ask reply, else ``None``.

    A reply that JSON cannot represent is not kept for deduplication. A retried ask of that
    message then gets an error saying the reply was not kept, and is not applied again.
    """
    try:
        _check("", value, "reply", set())
    except StateNotSerializable:
        return None
    if isinstance(value, dict | list | tuple):
        # A detached copy: the reply may share lists or dicts with the agent's state, which
        # later handlers change, and the kept reply must stay as it was sent.
        return json.loads(json.dumps(value))
    return value
