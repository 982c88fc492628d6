"""Shared fixtures: a fresh PostgreSQL database per test run, SQLite files, Ray settings."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

# Tests start Ray on the loopback address only, and its workers must import the test
# agent classes from this checkout.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    path for path in (ROOT, os.environ.get("PYTHONPATH", "")) if path
)
# Short retry budgets keep failure tests fast; the defaults ride out longer outages.
os.environ.setdefault("ARBOR_DB_RETRY_ATTEMPTS", "4")
os.environ.setdefault("ARBOR_DB_RETRY_BACKOFF_S", "0.05")
os.environ.setdefault("ARBOR_DASHBOARD", "false")
os.environ.setdefault("ARBOR_RECONCILE_INTERVAL_S", "0.5")

# The server that CI and the development machines run; trust authentication.
PG_ADMIN_URL = os.environ.get(
    "ARBOR_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def create_pg_database() -> str:
    """Create an empty PostgreSQL database and return its URL."""
    name = f"arbor_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    """Drop a database made by `create_pg_database`, ending its open sessions."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="module")
def module_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database shared by one test module."""
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """A SQLite store file in the test's temporary directory."""
    return f"sqlite:///{tmp_path}/arbor.db"


# The placements that the behaviour suites run under; see `arbor_cluster`.
PLACEMENTS = ["dedicated", "hosted"]


@contextlib.contextmanager
def arbor_cluster(placement: str, environment: dict[str, str] | None = None) -> Iterator[str]:
    """Run Arbor on a new local cluster and database, spawning with ``placement`` by default.

    Spawns that name a Ray placement option still get a dedicated actor, so one suite
    covers both placements. Yields the database URL.
    """
    import arbor

    settings = {"ARBOR_DEFAULT_PLACEMENT": placement, **(environment or {})}
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    url = create_pg_database()
    try:
        arbor.init(database_url=url, num_cpus=2, object_store_memory=100 * 1024**2)
        yield url
    finally:
        arbor.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        drop_pg_database(url)


def hosted() -> bool:
    """Return whether the running suite spawns hosted agents by default."""
    return os.environ.get("ARBOR_DEFAULT_PLACEMENT") == "hosted"
