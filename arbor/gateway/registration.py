"""The allow-lists of the gateway: agent types HTTP clients may spawn, and commands they may run.

A request names a registered type or command, never an import path, so a client cannot make
the cluster import arbitrary code. Entries come from `register_type` and `register_command`
(called before `arbor.gateway.deploy`, which passes them to the replicas) and from the
``ARBOR_GATEWAY_AGENT_TYPES`` and ``ARBOR_GATEWAY_COMMANDS`` settings.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from arbor.agent import Agent, import_type, type_path
from arbor.config import Settings
from arbor.errors import ConfigError

# The demo's code analysis, always available as the command "analysis".
BUILTIN_COMMANDS = {"analysis": "arbor.gateway.analysis:run_analysis"}

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")

_types: dict[str, str] = {}
_commands: dict[str, str] = {}


def register_type(name: str, agent_class: type[Agent]) -> None:
    """Allow HTTP clients to spawn ``agent_class`` under the type name ``name``.

    Raises:
        ConfigError: the name is malformed or the class is not an importable Agent.

    Example:
        >>> arbor.gateway.register_type("counter", Counter)
    """
    _check_name("agent type", name)
    if not (isinstance(agent_class, type) and issubclass(agent_class, Agent)):
        raise ConfigError(f"agent type {name!r}: {agent_class!r} is not a subclass of arbor.Agent")
    path = type_path(agent_class)
    if path.startswith("__main__:") or "<locals>" in path:
        raise ConfigError(
            f"agent type {name!r}: {path} cannot be imported by the gateway replicas; define "
            "the class at the top level of a module"
        )
    _types[name] = path


def register_command(name: str, function: Callable[..., Any]) -> None:
    """Allow ``POST /v1/commands`` to run ``function`` under the command name ``name``.

    The function runs in a detached Ray actor as ``function(params, progress)``: ``params``
    is the request's dict, and ``progress(kind, data)`` stores one event for the watchers.
    Its return value, which must be JSON, becomes the execution's result. A function may
    carry a pydantic model in its ``params_model`` attribute; the gateway then validates
    the parameters before it starts the command.

    Raises:
        ConfigError: the name is malformed or the function is not importable by path.
    """
    _check_name("command", name)
    path = f"{function.__module__}:{function.__qualname__}"
    if function.__module__ == "__main__" or "<locals>" in path:
        raise ConfigError(
            f"command {name!r}: {path} cannot be imported by the command actors; define the "
            "function at the top level of a module"
        )
    _commands[name] = path


def agent_types(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return every allowed agent type as name -> ``module:Class``."""
    return {
        **_parse_pairs("ARBOR_GATEWAY_AGENT_TYPES", settings.gateway_agent_types),
        **_types,
        **(extra or {}),
    }


def commands(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return every allowed command as name -> ``module:function``."""
    return {
        **BUILTIN_COMMANDS,
        **_parse_pairs("ARBOR_GATEWAY_COMMANDS", settings.gateway_commands),
        **_commands,
        **(extra or {}),
    }


def load_type(path: str) -> type[Agent]:
    """Import an allow-listed agent class."""
    return import_type(path)


def load_function(path: str) -> Callable[..., Any]:
    """Import an allow-listed command function from ``module:function``.

    Raises:
        ConfigError: the module or attribute is missing.
    """
    module_name, _, qualname = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            f"command function {path!r} cannot be imported ({error}); install its module on "
            "every Ray node"
        ) from error
    if not callable(target):
        raise ConfigError(f"command function {path!r} is not callable")
    result: Callable[..., Any] = target
    return result


def _parse_pairs(variable: str, text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, separator, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not separator or not _NAME.fullmatch(name) or ":" not in path:
            raise ConfigError(
                f"{variable} entry {item!r} is invalid; use name=module:Attribute, such as "
                "counter=myagents:Counter"
            )
        pairs[name] = path
    return pairs


def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{kind} name {name!r} is invalid; use 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter, digit or '_'"
        )
