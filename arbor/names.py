"""Namespaces: how agent, topic and principal names are qualified by their tenant.

Every agent, topic, reminder and capability lives in a namespace. Within one namespace a
name is written as it is, such as ``counter`` or ``workers/7``. The full name adds the
namespace and a colon in front, such as ``team-a:workers/7``, and is how Arbor stores,
lists and checks it. The namespace ``default`` has no prefix, so a full name without a
colon is in ``default``.

Names given to the API are relative to the caller's namespace (the one passed to
`arbor.init`, or the agent's own inside a handler) unless they name one explicitly.
Capability patterns are qualified the same way when they are granted, so a capability
granted in ``team-a`` for ``arbor://agent/send/*`` covers ``team-a`` agents only. Reaching
another namespace takes a pattern that names it, such as ``arbor://agent/send/team-b:*``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from arbor.errors import InvalidAgentName, InvalidArguments, InvalidResource

DEFAULT_NAMESPACE = "default"
SEPARATOR = ":"

# Like a Kubernetes namespace: lowercase letters, digits and '-', at most 63 characters.
_NAMESPACE_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

# Key principals are written key:<id> and client subscribers client:<id>, so neither
# word can name a namespace.
RESERVED_NAMESPACES = frozenset({"key", "client"})

# Resource kinds whose first path segment is a namespaced name.
NAMESPACED_KINDS = frozenset({"agent", "topic", "capability"})

_SCHEME = "arbor://"


def validate_namespace(namespace: object) -> str:
    """Return ``namespace`` if it is a valid namespace name.

    Raises:
        InvalidArguments: naming the value and the rule it breaks.
    """
    if not isinstance(namespace, str):
        raise InvalidArguments(f"namespace must be a string, got {type(namespace).__name__}")
    if not _NAMESPACE_PATTERN.fullmatch(namespace):
        raise InvalidArguments(
            f"namespace {namespace!r} is invalid; use 1 to 63 lowercase letters, digits and "
            "'-', starting and ending with a letter or digit, such as 'team-a'"
        )
    if namespace in RESERVED_NAMESPACES:
        raise InvalidArguments(f"namespace {namespace!r} is reserved; choose another name")
    return namespace


def split(full_name: str) -> tuple[str, str]:
    """Return the namespace and the name within it of a full name.

    The namespace part is not validated here; `qualify` does that.
    """
    namespace, separator, local = full_name.partition(SEPARATOR)
    if not separator:
        return DEFAULT_NAMESPACE, full_name
    return namespace, local


def namespace_of(full_name: str) -> str:
    """Return the namespace of a full name."""
    return split(full_name)[0]


def local_name(full_name: str) -> str:
    """Return a full name without its namespace."""
    return split(full_name)[1]


def join(namespace: str, local: str) -> str:
    """Return the full name of ``local`` in ``namespace``."""
    if namespace == DEFAULT_NAMESPACE:
        return local
    return f"{namespace}{SEPARATOR}{local}"


def qualify(name: str, namespace: str, error: Callable[[str], Exception] = InvalidAgentName) -> str:
    """Return the full name that ``name`` means when written in ``namespace``.

    A name that names a namespace (``team-b:counter``) keeps it, and ``default:counter``
    becomes ``counter``. A name that is not a string, or is empty, is returned unchanged,
    so the caller's own validation reports it as the caller wrote it.

    Raises:
        InvalidAgentName: the namespace part is not a valid namespace name; ``error``
            builds another exception from the message, such as `InvalidTopicName`.
    """
    if not isinstance(name, str) or not name:
        return name
    if SEPARATOR in name:
        explicit, _, local = name.partition(SEPARATOR)
        try:
            validate_namespace(explicit)
        except InvalidArguments as problem:
            raise error(f"name {name!r} names an invalid namespace: {problem}") from None
        return join(explicit, local)
    return join(namespace, name)


def qualify_principal(principal: str, namespace: str) -> str:
    """Like `qualify`, except that API keys and client subscribers belong to no namespace.

    They are written ``key:<id>`` and ``client:<id>``.
    """
    if isinstance(principal, str) and principal.partition(SEPARATOR)[0] in RESERVED_NAMESPACES:
        return principal
    return qualify(principal, namespace)


def qualify_pattern(pattern: str, namespace: str) -> str:
    """Return a capability pattern with its path qualified by ``namespace``.

    Only agent, topic and capability patterns name namespaced things. Other kinds, and
    text that is not a pattern at all, are returned unchanged for the URI parser to judge.
    A path that starts with ``default:`` loses that prefix, the canonical spelling.

    Raises:
        InvalidResource: the pattern names an invalid namespace.
    """
    if not isinstance(pattern, str) or not pattern.startswith(_SCHEME):
        return pattern
    parts = pattern[len(_SCHEME) :].split("/", 2)
    if len(parts) < 3 or parts[0] not in NAMESPACED_KINDS or not parts[2]:
        return pattern
    kind, operation, path = parts
    if kind == "capability" and path.startswith("key/"):
        # Key principals appear as key/<id> in capability paths and have no namespace.
        return pattern
    qualified = qualify(path, namespace, lambda message: InvalidResource(pattern, message))
    return f"{_SCHEME}{kind}/{operation}/{qualified}"


def namespace_problem(full_name: str) -> str | None:
    """Return what is wrong with the namespace part of a full name, or None if nothing is.

    A name without a colon has no namespace part and is fine here. ``default:`` is
    refused because a full name in ``default`` is written without a prefix.
    """
    if SEPARATOR not in full_name:
        return None
    namespace = full_name.partition(SEPARATOR)[0]
    if namespace == DEFAULT_NAMESPACE:
        return f"names in the namespace {DEFAULT_NAMESPACE!r} are written without a prefix"
    try:
        validate_namespace(namespace)
    except InvalidArguments as error:
        return str(error)
    return None
