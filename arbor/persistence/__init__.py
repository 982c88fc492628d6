"""Checkpoint stores: PostgreSQL for clusters, SQLite as the embedded default."""

from __future__ import annotations

from urllib.parse import urlsplit

from arbor.config import Settings, get_settings
from arbor.errors import ArborError
from arbor.persistence.audit import ALLOWED, DENIED, AuditEntry, AuditVerification
from arbor.persistence.audit_counter import AuditCounter
from arbor.persistence.base import (
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    AgentRecord,
    Checkpoint,
    CheckpointInfo,
    CheckpointStore,
    CheckpointWrite,
)
from arbor.persistence.jsonstate import encode_state

__all__ = [
    "ALLOWED",
    "DENIED",
    "FAILED",
    "RUNNING",
    "STARTING",
    "STOPPED",
    "AgentRecord",
    "AuditCounter",
    "AuditEntry",
    "AuditVerification",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointStore",
    "CheckpointWrite",
    "encode_state",
    "open_store",
]


def open_store(
    url: str | None = None, settings: Settings | None = None, *, migrate: bool = True
) -> CheckpointStore:
    """Open the store named by ``url`` (default ``ARBOR_DATABASE_URL``) and migrate it.

    Agent processes pass ``migrate=False``: the client and the registry have migrated the
    schema before any agent starts, and skipping the check shortens every spawn.

    With ``ARBOR_DATABASE_PASSWORD_SECRET`` set, a PostgreSQL URL gets its password from
    the secret provider (Vault or the environment) here, in every process that opens it.

    Raises:
        ArborError: the URL scheme is neither ``postgresql`` nor ``sqlite``.
        StoreUnavailable: the database stayed unreachable through every retry.
        SecretError: the password secret could not be read.
    """
    settings = settings or get_settings()
    url = url or settings.database_url
    scheme = urlsplit(url).scheme
    store: CheckpointStore
    if scheme in ("postgresql", "postgres"):
        from arbor.persistence.postgres import PostgresStore

        if settings.database_password_secret:
            url = _with_secret_password(url, settings)

        store = PostgresStore(
            url, settings.db_pool_max, settings.db_retry_attempts, settings.db_retry_backoff_s
        )
    elif scheme == "sqlite":
        from arbor.persistence.sqlite import SQLiteStore

        # sqlite:///relative/path and sqlite:////absolute/path, as in SQLAlchemy URLs.
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ArborError(
                f"ARBOR_DATABASE_URL {url!r} names no file; use sqlite:///path/to/arbor.db"
            )
        store = SQLiteStore(url, path, settings.db_retry_attempts, settings.db_retry_backoff_s)
    else:
        raise ArborError(
            f"ARBOR_DATABASE_URL scheme {scheme!r} is not supported; use postgresql://... "
            "or sqlite:///path"
        )
    if not migrate:
        return store
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


def _with_secret_password(url: str, settings: Settings) -> str:
    """Put the password from ``ARBOR_DATABASE_PASSWORD_SECRET`` into the PostgreSQL URL."""
    from arbor.security.secrets import provider_from_settings, resolve_database_url

    provider = provider_from_settings(settings)
    try:
        return resolve_database_url(settings.model_copy(update={"database_url": url}), provider)
    finally:
        provider.close()


def absolute_database_url(url: str) -> str:
    """Return ``url`` with a relative SQLite path made absolute against the working directory.

    Ray workers run in other directories, so every process must get the same absolute path.
    """
    import os

    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(url[len("sqlite:///") :])
    return url
