"""The store's PostgreSQL password read from Vault (the fake in tests/) or the environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from arbor.config import Settings
from arbor.errors import ArborError
from arbor.persistence import open_store
from tests.fake_vault import FakeVault

PASSWORD = "s3cret/with:symbols@"


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    with FakeVault() as server:
        server.put("db", {"password": PASSWORD})
        yield server


def test_password_comes_from_vault(pg_url: str, vault: FakeVault) -> None:
    settings = Settings(
        database_url=pg_url,
        database_password_secret="db/password",
        secret_provider="vault",
        vault_url=vault.url,
        vault_auth="token",
        vault_token=SecretStr(vault.issue_token()),
    )
    store = open_store(pg_url, settings)
    try:
        # The server trusts loopback connections, so the test checks the URL it was given.
        assert ":s3cret%2Fwith%3Asymbols%40@" in store.url
        assert store.list_agents() == []
    finally:
        store.close()


def test_password_comes_from_the_environment(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARBOR_SECRET_DB_PASSWORD", "from-env")
    settings = Settings(
        database_url=pg_url, database_password_secret="db/password", secret_provider="env"
    )
    store = open_store(pg_url, settings)
    try:
        assert ":from-env@" in store.url
    finally:
        store.close()


def test_url_with_its_own_password_is_rejected(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARBOR_SECRET_DB_PASSWORD", "from-env")
    url = pg_url.replace("postgres@", "postgres:inline@")
    settings = Settings(database_url=url, database_password_secret="db/password")
    with pytest.raises(ArborError, match="already contains a password") as caught:
        open_store(url, settings)
    assert "inline" not in str(caught.value)
    assert "from-env" not in str(caught.value)
