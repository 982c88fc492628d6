"""Arbor settings, read from ``ARBOR_*`` environment variables."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from arbor.errors import ConfigError, InvalidArguments
from arbor.names import validate_namespace

# The Ray namespace that contains every Arbor actor, so that `ray.get_actor` from any
# driver finds agents and the registry whatever namespace that driver runs in.
NAMESPACE = "arbor"
REGISTRY_NAME = "arbor-registry"


class Settings(BaseSettings):
    """Runtime settings; each field maps to the variable ``ARBOR_<FIELD>``."""

    # Every float setting is a number of seconds or a ratio, so inf and nan are rejected.
    model_config = SettingsConfigDict(env_prefix="ARBOR_", extra="ignore", allow_inf_nan=False)

    database_url: str = Field(
        default="sqlite:///.arbor/arbor.db",
        description="Checkpoint store: postgresql://... or sqlite:///path (relative to the "
        "working directory of the process that first opens it).",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join; unset means the latest local cluster, else a new one.",
    )
    checkpoint_keep: int = Field(
        default=10,
        ge=1,
        description="Checkpoints kept per agent; older ones are deleted in the write transaction.",
    )
    dedup_window: int = Field(
        default=256,
        ge=0,
        description="Processed message ids (and ask replies) kept in each checkpoint. A retried "
        "message older than this window is applied again, so keep it above the number of "
        "messages a sender can have in flight.",
    )
    durability: Literal["durable", "periodic", "batched"] = Field(
        default="durable",
        description="durable: commit a checkpoint before acknowledging a message that changed "
        "state. batched: the same, with the checkpoints of the agents in one host committed "
        "together. periodic: checkpoint every checkpoint_interval_s seconds.",
    )
    batch_window_s: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Seconds a host's group commit waits after a batch's first checkpoint "
        "for others to join it, in batched durability. 0 commits what has queued as soon "
        "as a committer thread is free, so batches form while the other one commits.",
    )
    checkpoint_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between checkpoints in periodic mode.",
    )
    ask_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Default timeout of AgentRef.ask, in seconds.",
    )
    spawn_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds to wait for a new agent's actor to restore and respond; a cold "
        "Ray worker with a large runtime_env can take tens of seconds to start.",
    )
    handler_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="Default running-time limit of a message handler, in seconds; 0 means "
        "none. A handler past its limit fails its message with AskTimeout, and the agent's "
        "process restarts from the last checkpoint. @arbor.handler(timeout=...) sets one "
        "handler's limit.",
    )
    stop_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a graceful stop waits for the agent's on_stop hook and final "
        "checkpoint before it kills the agent's process.",
    )
    namespace: str = Field(
        default="default",
        description="The namespace that this process's agent, topic and principal names are "
        "relative to; arbor.init(namespace=...) overrides it.",
    )
    max_agents: int = Field(
        default=0,
        ge=0,
        description="Cap on agents starting or running in each namespace; a spawn past it "
        "fails with QuotaExceeded. 0 means no cap.",
    )
    namespace_max_agents: dict[str, int] = Field(
        default_factory=dict,
        description='Caps for single namespaces as a JSON object, such as {"team-a": 500}; '
        "a namespace not listed has ARBOR_MAX_AGENTS. 0 means no cap.",
    )
    reconcile_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between reconciler passes that recreate agents whose actors are gone.",
    )
    reconcile_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a spawn may take before the reconciler treats its agent as lost.",
    )
    reminder_min_period_s: float = Field(
        default=1.0,
        gt=0,
        description="Shortest period of a periodic reminder, in seconds. Each firing costs a "
        "registry-to-agent message and a database write; use timers for finer periods.",
    )
    reminder_resync_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between the registry's full re-reads of the reminder table. "
        "Reminders set through the registry take effect at once; the re-read only picks up "
        "rows changed by other processes, such as a second registry during an upgrade.",
    )
    topic_max_lag: int = Field(
        default=10_000,
        ge=1,
        description="Events a topic subscriber may fall behind the newest one before the "
        "oldest undelivered events are skipped for it and counted; subscribe(max_lag=...) "
        "sets it per subscription. It bounds each topic's stored log to about this many "
        "events, so a stalled subscriber cannot grow the database without end.",
    )
    db_retry_attempts: int = Field(
        default=8,
        ge=1,
        description="Attempts for a store operation when the database is unreachable.",
    )
    db_retry_backoff_s: float = Field(
        default=0.1,
        gt=0,
        description="First retry delay in seconds; it doubles per attempt, capped at 5 s, "
        "so the default attempts span about 12 s of outage.",
    )
    db_pool_max: int = Field(
        default=2,
        ge=1,
        description="PostgreSQL connections per process; each agent actor is one process.",
    )
    warm_pool_size: int = Field(
        default=0,
        ge=0,
        description="Started, empty actors kept ready per agent class and per node with "
        "CPUs after the class's first spawn, so that a spawn without placement options "
        "claims one instead of waiting for a new Ray worker process. Each holds an idle "
        "process of about 100 MB. 0 turns the pool off.",
    )
    warm_pool_max: int = Field(
        default=8,
        ge=0,
        description="Most warm actors per agent class and node: the pool grows past "
        "ARBOR_WARM_POOL_SIZE to the number of the class's spawns in the last 10 s "
        "(divided among the nodes), up to this, and shrinks back when spawns slow down.",
    )
    default_placement: Literal["dedicated", "hosted"] = Field(
        default="dedicated",
        description="Placement of spawns that name neither placement nor a Ray placement "
        "option such as num_cpus: 'dedicated' (a Ray actor per agent) or 'hosted'.",
    )
    hosts_per_node: int = Field(
        default=1,
        ge=1,
        description="Host actors per alive Ray node for agents spawned with "
        "placement='hosted'. Each host is one process that runs many agents; the Ray "
        "scheduler spreads hosts over the nodes.",
    )
    host_threads: int = Field(
        default=16,
        ge=2,
        description="Threads per host that run synchronous handlers, agent starts and "
        "checkpoint writes of hosted agents; it bounds how many of them run at once.",
    )
    host_db_pool_max: int = Field(
        default=8,
        ge=1,
        description="PostgreSQL connections per host process, shared by its agents. A host "
        "with batched agents opens two more, one per group committer thread.",
    )
    passivate_idle_s: float = Field(
        default=0.0,
        ge=0,
        description="Seconds without messages after which a hosted agent is passivated: "
        "its state is checkpointed and its object dropped until the next message; 0 "
        "means never. The spawn option passivate_idle_s sets it per agent.",
    )
    enforce_capabilities: bool = Field(
        default=True,
        description="Check a capability for every message, spawn, stop and secret read that "
        "an agent or API key makes. Code that connects to Ray directly (a driver) acts as "
        "the operator and is not checked.",
    )
    capability_ttl_s: float = Field(
        default=365 * 24 * 3600.0,
        gt=0,
        description="Lifetime of a capability granted without an explicit expiry, in seconds.",
    )
    revocation_poll_s: float = Field(
        default=0.2,
        gt=0,
        description="Seconds between each process's reads of new revocations; a revocation "
        "takes effect everywhere within about this long plus one database read.",
    )
    audit_flush_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between writes of the counts of allowed capability checks to "
        "the audit log; denials are written at once.",
    )
    cluster_id: str | None = Field(
        default=None,
        description="The Ray cluster's id for the cluster lease. The registry sets it in the "
        "settings of the agent actors it starts; leave it unset.",
    )
    dashboard: bool = Field(
        default=True,
        description="Start the Ray dashboard when Arbor starts a local Ray cluster.",
    )
    secret_provider: Literal["env", "vault", "vault+env"] = Field(
        default="env",
        description="Where secrets come from: env reads ARBOR_SECRET_<PATH> variables, vault "
        "reads Vault's KV v2 engine, vault+env tries Vault and then the environment.",
    )
    vault_url: str | None = Field(
        default=None,
        description="Vault address, for example https://vault.example:8200.",
    )
    vault_auth: Literal["token", "approle", "kubernetes"] = Field(
        default="token",
        description="Vault auth method: token (vault_token), approle (vault_role_id and "
        "vault_secret_id) or kubernetes (vault_k8s_role and the service account token file).",
    )
    vault_auth_mount: str | None = Field(
        default=None,
        description="Path the auth method is mounted at; unset means the method's own name.",
    )
    vault_token: SecretStr | None = Field(default=None, description="Vault token for token auth.")
    vault_role_id: str | None = Field(default=None, description="AppRole role_id.")
    vault_secret_id: SecretStr | None = Field(default=None, description="AppRole secret_id.")
    vault_k8s_role: str | None = Field(
        default=None, description="Vault role for Kubernetes service account auth."
    )
    vault_k8s_token_path: str = Field(
        default="/var/run/secrets/kubernetes.io/serviceaccount/token",
        description="File holding the pod's service account JWT; it is read again at each "
        "login because the kubelet rotates it.",
    )
    vault_mount: str = Field(default="secret", description="Mount path of the KV v2 engine.")
    vault_namespace: str | None = Field(
        default=None, description="Vault Enterprise namespace; unset for open-source Vault."
    )
    vault_ca_cert: str | None = Field(
        default=None,
        description="CA bundle file that verifies Vault's TLS certificate; unset means the "
        "system trust store.",
    )
    vault_timeout_s: float = Field(
        default=10.0, gt=0, description="Timeout of each request to Vault, in seconds."
    )
    database_password_secret: str | None = Field(
        default=None,
        description="Secret path (for example db/password) whose value becomes the password "
        "in database_url.",
    )
    signing_key_secret: str | None = Field(
        default=None,
        description="Secret path of the hex-encoded cluster signing key (at least 32 bytes).",
    )
    metrics: bool = Field(
        default=True,
        description="Record Arbor's Prometheus metrics through ray.util.metrics; false makes "
        "every recording call return at once.",
    )
    mailbox_sample_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="Seconds between the registry's reads of queued messages, from Ray's state "
        "API for dedicated agents and from the hosts for hosted ones, for the "
        "arbor_mailbox_depth gauge; 0 turns the reads off. Each read asks the Ray dashboard "
        "for every unfinished actor task, which took about 0.2 s on two cores.",
    )
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="Log line format: json writes one JSON object per line for log "
        "collectors, text writes plain lines for people.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="WARNING",
        description="Level of the root logger set by configure_logging; case-insensitive.",
    )
    trace_sample_ratio: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of new traces that are recorded, from 0.0 to 1.0. A span with "
        "a parent follows its parent's decision, so a trace is kept or dropped whole.",
    )
    gateway_agent_types: str = Field(
        default="",
        description="Agent types that HTTP clients may spawn, as comma-separated "
        "name=module:Class pairs; a request names the type, never an import path.",
    )
    gateway_commands: str = Field(
        default="",
        description="Extra asynchronous commands for POST /v1/commands, as comma-separated "
        "name=module:function pairs; the demo analysis is always registered as 'analysis'.",
    )
    gateway_analysis_roots: str = Field(
        default="",
        description="Folders, separated by os.pathsep, whose trees the 'analysis' command may "
        "read besides the Python standard library.",
    )
    gateway_max_body_bytes: int = Field(
        default=1_048_576,
        ge=1,
        description="Largest request body the gateway accepts, in bytes; larger ones get 413.",
    )
    gateway_request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a gateway request may wait for the registry or an agent before "
        "it returns 504; a message's own timeout may be shorter.",
    )
    gateway_min_replicas: int = Field(
        default=1, ge=1, description="Minimum number of gateway replicas Serve's autoscaler keeps."
    )
    gateway_max_replicas: int = Field(
        default=2, ge=1, description="Maximum number of gateway replicas Serve's autoscaler starts."
    )
    gateway_access_log: bool = Field(
        default=True,
        description="Log one line per gateway request (Serve's access log).",
    )
    gateway_max_ongoing_requests: int = Field(
        default=100,
        ge=1,
        description="Requests one gateway replica handles at once; each open event stream "
        "counts as one for as long as it lasts.",
    )

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, value: str) -> str:
        try:
            return validate_namespace(value)
        except InvalidArguments as error:
            raise ValueError(str(error)) from None

    @field_validator("namespace_max_agents")
    @classmethod
    def _valid_namespace_caps(cls, value: dict[str, int]) -> dict[str, int]:
        for namespace, cap in value.items():
            try:
                validate_namespace(namespace)
            except InvalidArguments as error:
                raise ValueError(str(error)) from None
            if cap < 0:
                raise ValueError(f"the cap of namespace {namespace!r} is {cap}; use 0 or more")
        return value

    def agent_cap(self, namespace: str) -> int:
        """Return the cap on agents in ``namespace``; 0 means no cap."""
        return self.namespace_max_agents.get(namespace, self.max_agents)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def _setting_problem(problem: Any) -> str:
    """Describe one invalid setting: its variable, value, rule and default."""
    location = problem["loc"]
    variable = f"ARBOR_{'_'.join(str(part) for part in location).upper()}"
    text = f"{variable}={problem.get('input')!r}: {problem['msg']}"
    field = Settings.model_fields.get(str(location[0])) if location else None
    if field is None or field.is_required():
        return text
    default = field.get_default(call_default_factory=True)
    return f"{text} (unset {variable} for the default, {default!r})"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment.

    Raises:
        ConfigError: naming each variable whose value is invalid and why.
    """
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(_setting_problem(problem) for problem in error.errors())
        raise ConfigError(f"invalid settings: {problems}") from None
    except SettingsError as error:
        # A value that must be JSON, such as ARBOR_NAMESPACE_MAX_AGENTS, did not parse.
        match = re.search(r'field "([a-z_]+)"', str(error))
        variable = f"ARBOR_{match.group(1).upper()}" if match else "an ARBOR_* variable"
        value = os.environ.get(variable)
        raise ConfigError(
            f"invalid settings: {variable}={value!r} is not valid JSON; write it as JSON, "
            'such as {"team-a": 500}'
        ) from None


def reset_settings() -> None:
    """Forget cached settings so the next `get_settings` reads the environment again."""
    get_settings.cache_clear()


_PASSWORD_IN_URL = re.compile(r"(://[^:/@]+:)([^@]*)(@)")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for logs and error messages."""
    redacted = _PASSWORD_IN_URL.sub(r"\1***\3", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", redacted)
