"""Names and spawn requests without a cluster: qualified names, URIs, patterns, spawn errors."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from arbor.config import Settings, get_settings, reset_settings
from arbor.errors import (
    ConfigError,
    InvalidAgentName,
    InvalidArguments,
    InvalidResource,
    InvalidTopicName,
)
from arbor.gateway.models import AGENT_NAME_PATTERN
from arbor.names import (
    local_name,
    namespace_of,
    qualify,
    qualify_pattern,
    qualify_principal,
    validate_namespace,
)
from arbor.registry.spec import spawn_error, validate_name
from arbor.registry.topic_spec import validate_topic
from arbor.security import parse_pattern, parse_resource
from arbor.security.blocks import CapabilityBlock, find_widening, resource_regex


@pytest.mark.parametrize(
    ("name", "namespace", "full"),
    [
        ("counter", "default", "counter"),
        ("counter", "team-a", "team-a:counter"),
        ("workers/7", "team-a", "team-a:workers/7"),
        ("team-b:counter", "team-a", "team-b:counter"),
        ("default:counter", "team-a", "counter"),
        ("team-b:workers/7", "default", "team-b:workers/7"),
    ],
)
def test_qualify_names_relative_to_the_namespace(name: str, namespace: str, full: str) -> None:
    assert qualify(name, namespace) == full


def test_namespace_of_a_full_name() -> None:
    assert namespace_of("counter") == "default"
    assert namespace_of("team-a:workers/7") == "team-a"
    assert local_name("team-a:workers/7") == "workers/7"


@pytest.mark.parametrize("namespace", ["Team-A", "team_a", "-team", "team-", "", "a" * 64, "key"])
def test_invalid_namespaces_are_rejected_with_the_rule(namespace: str) -> None:
    with pytest.raises(InvalidArguments, match=re.escape(repr(namespace))):
        validate_namespace(namespace)


def test_qualify_rejects_invalid_namespace_part() -> None:
    with pytest.raises(InvalidAgentName, match="'Team_B:counter' names an invalid namespace"):
        qualify("Team_B:counter", "team-a")
    with pytest.raises(InvalidTopicName, match="'Bad:t' names an invalid namespace"):
        qualify("Bad:t", "team-a", InvalidTopicName)
    with pytest.raises(InvalidResource, match="'Bad' is invalid"):
        qualify_pattern("arbor://agent/ask/Bad:x", "team-a")


def test_qualify_leaves_empty_name_for_the_validator() -> None:
    assert qualify("", "team-a") == ""
    with pytest.raises(InvalidAgentName, match="agent name '' is invalid"):
        validate_name(qualify("", "team-a"))


def test_key_principals_stay_outside_namespaces() -> None:
    key = "key:0123456789abcdef"
    assert qualify_principal(key, "team-a") == key
    assert qualify_principal("client:0123456789abcdef", "team-a") == "client:0123456789abcdef"
    assert qualify_principal("worker", "team-a") == "team-a:worker"


@pytest.mark.parametrize(
    ("pattern", "qualified"),
    [
        ("arbor://agent/send/*", "arbor://agent/send/team-a:*"),
        ("arbor://agent/*/workers/**", "arbor://agent/*/team-a:workers/**"),
        ("arbor://agent/ask/team-b:c", "arbor://agent/ask/team-b:c"),
        ("arbor://agent/ask/default:c", "arbor://agent/ask/c"),
        ("arbor://topic/publish/orders/eu", "arbor://topic/publish/team-a:orders/eu"),
        ("arbor://capability/grant/workers/*", "arbor://capability/grant/team-a:workers/*"),
        ("arbor://capability/grant/key/*", "arbor://capability/grant/key/*"),
        ("arbor://secret/read/db/password", "arbor://secret/read/db/password"),
        ("not a pattern", "not a pattern"),
    ],
)
def test_qualify_pattern(pattern: str, qualified: str) -> None:
    assert qualify_pattern(pattern, "team-a") == qualified


def test_qualify_pattern_in_default_namespace_changes_nothing() -> None:
    assert qualify_pattern("arbor://agent/send/*", "default") == "arbor://agent/send/*"


def test_resource_uri_keeps_its_namespace() -> None:
    resource = parse_resource("arbor://agent/send/team-a:workers/7")
    assert resource.namespace == "team-a"
    assert resource.path == ("workers", "7")
    assert str(resource) == "arbor://agent/send/team-a:workers/7"
    assert parse_resource("arbor://agent/send/workers/7").namespace == "default"


@pytest.mark.parametrize(
    ("uri", "rule"),
    [
        ("arbor://agent/send/default:x", "without a prefix"),
        ("arbor://agent/send/Team:x", "namespace 'Team' is invalid"),
        ("arbor://agent/send/*:x", "namespace '*' is invalid"),
        ("arbor://secret/read/team-a:db/password", "secret paths have no namespace"),
        ("arbor://agent/send/workers/team-a:x", "segment 'team-a:x' is invalid"),
    ],
)
def test_bad_namespace_in_uri_is_rejected(uri: str, rule: str) -> None:
    with pytest.raises(InvalidResource, match=re.escape(rule)):
        parse_pattern(uri)


def test_wildcards_never_cross_namespaces() -> None:
    everything_here = parse_pattern("arbor://agent/*/**")
    assert everything_here.matches("arbor://agent/ask/workers/7")
    assert not everything_here.matches("arbor://agent/ask/team-b:workers/7")

    team_a = parse_pattern("arbor://agent/*/team-a:**")
    assert team_a.matches("arbor://agent/ask/team-a:workers/7")
    assert not team_a.matches("arbor://agent/ask/workers/7")
    assert not team_a.matches("arbor://agent/ask/team-b:workers/7")

    assert parse_pattern("arbor://agent/ask/team-b:c").matches("arbor://agent/ask/team-b:c")


def test_pattern_covers_own_namespace_only() -> None:
    parent = parse_pattern("arbor://agent/*/team-a:**")
    assert parent.covers(parse_pattern("arbor://agent/ask/team-a:workers/*"))
    assert not parent.covers(parse_pattern("arbor://agent/ask/team-b:workers/*"))
    assert not parse_pattern("arbor://agent/*/**").covers(
        parse_pattern("arbor://agent/ask/team-a:x")
    )


EXPIRES_AT = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)


def _block(pattern: str, index: int, depth: int) -> CapabilityBlock:
    parsed = parse_pattern(pattern)
    return CapabilityBlock(
        index=index,
        principal="team-a:holder",
        pattern=parsed,
        operations=parsed.operations,
        expires_at=EXPIRES_AT,
        depth=depth,
        max_uses=None,
        allowed_callers=None,
    )


def test_delegation_cannot_move_a_capability_to_another_namespace() -> None:
    parent = _block("arbor://agent/*/team-a:**", 0, 2)
    widening = find_widening((parent,), _block("arbor://agent/ask/team-b:x", 1, 1))
    assert widening is not None and "wider" in widening
    assert find_widening((parent,), _block("arbor://agent/ask/team-a:x", 1, 1)) is None


def test_token_regex_names_the_namespace() -> None:
    pattern = parse_pattern("arbor://agent/ask/team-a:workers/*")
    regex = re.compile(resource_regex(pattern, pattern.operations))
    assert regex.match("arbor://agent/ask/team-a:workers/7")
    assert not regex.match("arbor://agent/ask/workers/7")
    assert not regex.match("arbor://agent/ask/team-b:workers/7")


@pytest.mark.parametrize("name", ["team-a:counter", "team-a:workers/7", "counter"])
def test_full_agent_and_topic_names_are_valid(name: str) -> None:
    assert validate_name(name) == name
    assert validate_topic(name) == name
    assert re.fullmatch(AGENT_NAME_PATTERN, name)


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("default:counter", "without a prefix"),
        ("Team:counter", "namespace 'Team' is invalid"),
        ("client:counter", "reserved"),
        ("team-a:arbor-x", "reserved"),
        ("team-a:", "is invalid"),
        ("team-a:b:c", "is invalid"),
    ],
)
def test_invalid_full_names_are_rejected(name: str, rule: str) -> None:
    with pytest.raises(InvalidAgentName, match=re.escape(rule)):
        validate_name(name)
    if not name.startswith("team-a:arbor-"):
        with pytest.raises(InvalidTopicName):
            validate_topic(name)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ARBOR_NAMESPACE_MAX_AGENTS", "notjson", "'notjson' is not valid JSON"),
        ("ARBOR_NAMESPACE_MAX_AGENTS", '{"Team": 3}', "namespace 'Team' is invalid"),
        ("ARBOR_NAMESPACE_MAX_AGENTS", '{"team": -1}', "use 0 or more"),
        ("ARBOR_MAX_AGENTS", "abc", "ARBOR_MAX_AGENTS='abc'"),
        ("ARBOR_NAMESPACE", "Team_A", "ARBOR_NAMESPACE='Team_A'"),
        ("ARBOR_DURABILITY", "fast", "(unset ARBOR_DURABILITY for the default, 'durable')"),
        ("ARBOR_WARM_POOL_SIZE", "-1", "(unset ARBOR_WARM_POOL_SIZE for the default, 0)"),
        ("ARBOR_ASK_TIMEOUT_S", "inf", "ARBOR_ASK_TIMEOUT_S='inf': Input should be a finite"),
        ("ARBOR_TRACE_SAMPLE_RATIO", "nan", "ARBOR_TRACE_SAMPLE_RATIO='nan'"),
    ],
)
def test_bad_settings_raise_config_error_naming_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    reset_settings()
    try:
        with pytest.raises(ConfigError, match=re.escape(message)) as raised:
            get_settings()
        assert variable in str(raised.value)
    finally:
        monkeypatch.delenv(variable)
        reset_settings()


def test_namespace_caps_fall_back_to_max_agents() -> None:
    settings = Settings(max_agents=5, namespace_max_agents={"team-a": 2, "team-b": 0})

    assert settings.agent_cap("team-a") == 2
    assert settings.agent_cap("team-b") == 0
    assert settings.agent_cap("team-c") == 5


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_passivate_setting_rejects_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ARBOR_PASSIVATE_IDLE_S", value)
    reset_settings()
    try:
        with pytest.raises(ConfigError, match=f"ARBOR_PASSIVATE_IDLE_S='{value}'"):
            get_settings()
    finally:
        monkeypatch.undo()
        reset_settings()


def test_passivation_check_left_to_registry() -> None:
    """Without placement, the registry's default placement decides, so the spec passes."""
    from arbor.registry.spec import build_spawn_spec
    from tests.agents import Counter

    spec = build_spawn_spec(Counter, "c1", (), {"passivate_idle_s": 5})
    assert spec.options["passivate_idle_s"] == 5
    with pytest.raises(InvalidArguments, match="hosted agents only"):
        build_spawn_spec(Counter, "c2", (), {"passivate_idle_s": 5, "num_cpus": 1})
    with pytest.raises(InvalidArguments, match="hosted agents only"):
        build_spawn_spec(Counter, "c3", (), {"passivate_idle_s": 5, "placement": "dedicated"})


def test_spawn_error_drops_colour_codes() -> None:
    text = "\x1b[36m(Bad pid=7)\x1b[0m Traceback:\n\x1b[1;31mValueError: boom in init\x1b[0m"

    error = spawn_error("team-a:bad", RuntimeError(text))

    assert "\x1b" not in str(error)
    assert error.error_message == "ValueError: boom in init"
    assert error.traceback == "(Bad pid=7) Traceback:\nValueError: boom in init"
