"""Arbor settings, read from ``ARBOR_*`` environment variables."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The Ray namespace that contains every Arbor actor, so that `ray.get_actor` from any
# driver finds agents and the registry whatever namespace that driver runs in.
NAMESPACE = "arbor"
REGISTRY_NAME = "arbor-registry"


class Settings(BaseSettings):
    """Runtime settings; each field maps to the variable ``ARBOR_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="ARBOR_", extra="ignore")

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
    durability: Literal["durable", "periodic"] = Field(
        default="durable",
        description="durable: commit a checkpoint before acknowledging a message that changed "
        "state. periodic: checkpoint every checkpoint_interval_s seconds.",
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
        description="Started, empty actors kept ready per agent class after its first spawn, "
        "so that a spawn without placement options claims one instead of waiting for a new "
        "Ray worker process. Each holds an idle process of about 100 MB.",
    )
    dashboard: bool = Field(
        default=True,
        description="Start the Ray dashboard when Arbor starts a local Ray cluster.",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()


def reset_settings() -> None:
    """Forget cached settings so the next `get_settings` reads the environment again."""
    get_settings.cache_clear()


_PASSWORD_IN_URL = re.compile(r"(://[^:/@]+:)([^@]*)(@)")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for logs and error messages."""
    redacted = _PASSWORD_IN_URL.sub(r"\1***\3", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", redacted)
