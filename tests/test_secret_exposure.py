"""A secret an agent reads from Vault stays out of Ray's state API, which the dashboard shows.

The agents read from the Vault-compatible test server in tests/fake_vault.py on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from ray.util import state

import arbor
from arbor.config import reset_settings
from arbor.observability.mailbox import state_api_url
from tests.agents import Delegator
from tests.fake_vault import FakeVault

SECRET_VALUE = "vault-only-7f3a9c"

VARIABLES = {
    "ARBOR_DASHBOARD": "true",
    "ARBOR_SECRET_PROVIDER": "vault",
    "ARBOR_VAULT_AUTH": "token",
}


@pytest.fixture(scope="module")
def vault() -> Iterator[FakeVault]:
    with FakeVault() as server:
        server.put("payments", {"api_key": SECRET_VALUE})
        yield server


@pytest.fixture(scope="module", autouse=True)
def cluster(module_pg_url: str, vault: FakeVault) -> Iterator[None]:
    token = vault.issue_token(ttl=3600, max_ttl=7200)
    saved = {
        key: os.environ.get(key) for key in [*VARIABLES, "ARBOR_VAULT_URL", "ARBOR_VAULT_TOKEN"]
    }
    os.environ.update(VARIABLES)
    os.environ["ARBOR_VAULT_URL"] = vault.url
    os.environ["ARBOR_VAULT_TOKEN"] = token
    reset_settings()
    arbor.init(database_url=module_pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    yield
    arbor.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    reset_settings()


def test_vault_secret_absent_from_state_api() -> None:
    reader = arbor.spawn(Delegator, "exposure/reader")
    arbor.grant("exposure/reader", "arbor://secret/read/payments/api_key")
    assert reader.ask("read_secret", "payments/api_key") == SECRET_VALUE

    # This cluster's own state API, even when other Ray clusters run on the machine.
    address = state_api_url()
    assert address is not None, "the test cluster runs without a dashboard"
    views = {
        "actors": state.list_actors(address=address, detail=True, limit=1000),
        "tasks": state.list_tasks(address=address, detail=True, limit=1000),
        "workers": state.list_workers(address=address, detail=True, limit=1000),
        "jobs": state.list_jobs(address=address),
    }
    for name, rows in views.items():
        text = json.dumps([getattr(row, "__dict__", row) for row in rows], default=str)
        assert SECRET_VALUE not in text, name
    assert any(row.class_name == "Delegator" for row in views["actors"])


def test_denied_secret_read_hides_value() -> None:
    reader = arbor.spawn(Delegator, "exposure/denied")
    with pytest.raises(arbor.HandlerError) as caught:
        reader.ask("read_secret", "payments/api_key")
    assert "arbor://secret/read/payments/api_key" in str(caught.value)
    assert SECRET_VALUE not in str(caught.value)
    assert SECRET_VALUE not in caught.value.traceback
