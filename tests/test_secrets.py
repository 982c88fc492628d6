"""Secret providers: Vault through hvac against tests/fake_vault.py, the environment, chains."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg.conninfo
import pytest

from arbor.config import Settings
from arbor.errors import (
    ArborError,
    InvalidSecretPath,
    SecretBackendError,
    SecretError,
    SecretNotFound,
)
from arbor.security.secrets import (
    ChainSecretProvider,
    EnvSecretProvider,
    Secret,
    env_variable_name,
    provider_from_settings,
    resolve_database_url,
    signing_key,
    split_secret_path,
)
from arbor.security.vault import (
    AppRoleAuth,
    KubernetesAuth,
    TokenAuth,
    VaultSecretProvider,
)
from tests.fake_vault import FakeVault

DB_PASSWORD = "pw-Vault-7f3a9c"
ROLE_ID = "role-arbor"
SECRET_ID = "secret-id-5d1e88"
K8S_ROLE = "arbor-agents"
K8S_JWT = "eyJhbGciOiJSUzI1NiJ9.fake-service-account.jwt-0b7c"

# Token TTLs of the fake server's roles, in seconds on its clock.
TTL_S = 60
MAX_TTL_S = 100


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    with FakeVault() as server:
        server.put("db", {"password": DB_PASSWORD, "port": 5432})
        server.add_approle(ROLE_ID, SECRET_ID, ttl=TTL_S, max_ttl=MAX_TTL_S)
        server.add_kubernetes_role(K8S_ROLE, K8S_JWT, ttl=TTL_S, max_ttl=MAX_TTL_S)
        yield server


@pytest.fixture
def jwt_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(K8S_JWT + "\n")
    return str(path)


def connect(server: FakeVault, auth: object, **options: object) -> VaultSecretProvider:
    """A provider on the server's clock whose renewal thread polls every 10 ms."""
    options.setdefault("check_interval_s", 0.01)
    options.setdefault("retry_interval_s", 1.0)
    return VaultSecretProvider(server.url, auth, clock=server.clock, **options)  # type: ignore[arg-type]


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def settle() -> None:
    """Give the renewal thread, which polls every 10 ms, time to act if it is going to."""
    time.sleep(0.2)


# --- reading through each auth method ---------------------------------------------------


def test_token_auth_reads_secret(vault: FakeVault) -> None:
    token = vault.issue_token()
    with connect(vault, TokenAuth(token)) as provider:
        secret = provider.read("db/password")

    assert secret.reveal() == DB_PASSWORD
    assert secret.path == "db/password"
    assert vault.count("GET", "/v1/secret/data/db") == 1


def test_approle_auth_reads_secret(vault: FakeVault) -> None:
    with connect(vault, AppRoleAuth(ROLE_ID, SECRET_ID)) as provider:
        assert provider.read("db/password").reveal() == DB_PASSWORD

    assert vault.count("POST", "/v1/auth/approle/login") == 1


def test_kubernetes_auth_reads_secret(vault: FakeVault, jwt_file: str) -> None:
    with connect(vault, KubernetesAuth(K8S_ROLE, token_path=jwt_file)) as provider:
        assert provider.read("db/password").reveal() == DB_PASSWORD

    assert vault.count("POST", "/v1/auth/kubernetes/login") == 1


def test_custom_mounts_are_used(jwt_file: str) -> None:
    with FakeVault(kv_mount="arbor-kv") as server:
        server.kubernetes_mount = "k8s-prod"
        server.add_kubernetes_role(K8S_ROLE, K8S_JWT, ttl=TTL_S, max_ttl=MAX_TTL_S)
        server.put("cluster", {"signing_key": "ab" * 32})
        auth = KubernetesAuth(K8S_ROLE, token_path=jwt_file, mount="k8s-prod")
        with connect(server, auth, mount="arbor-kv") as provider:
            assert provider.read("cluster/signing_key").reveal() == "ab" * 32

        assert server.count("POST", "/v1/auth/k8s-prod/login") == 1
        assert server.count("GET", "/v1/arbor-kv/data/cluster") == 1


def test_nested_secret_path_reads_last_segment_as_field(vault: FakeVault) -> None:
    vault.put("apps/billing/db", {"password": "nested-pw"})
    with connect(vault, TokenAuth(vault.issue_token())) as provider:
        assert provider.read("apps/billing/db/password").reveal() == "nested-pw"


# --- login and read errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "make_auth", "credential"),
    [
        ("token", lambda jwt_path: TokenAuth("hvs.wrong-token-1c9e"), "hvs.wrong-token-1c9e"),
        (
            "approle",
            lambda jwt_path: AppRoleAuth(ROLE_ID, "wrong-secret-id-4b"),
            "wrong-secret-id-4b",
        ),
        (
            "kubernetes",
            lambda jwt_path: KubernetesAuth("other-role", token_path=jwt_path),
            K8S_JWT,
        ),
    ],
)
def test_wrong_credentials_name_method_and_address(
    vault: FakeVault,
    jwt_file: str,
    method: str,
    make_auth: Callable[[str], object],
    credential: str,
) -> None:
    with pytest.raises(SecretBackendError) as caught:
        connect(vault, make_auth(jwt_file))

    message = str(caught.value)
    assert f"Vault {method} login" in message
    assert vault.url in message
    assert credential not in message
    assert DB_PASSWORD not in message


def test_wrong_credentials_keep_secret_out_of_traceback(vault: FakeVault) -> None:
    # Made at run time, so the source lines in the traceback cannot contain it.
    wrong_secret_id = f"wrong-{uuid.uuid4().hex}"

    with pytest.raises(SecretBackendError) as caught:
        connect(vault, AppRoleAuth(ROLE_ID, wrong_secret_id))

    rendered = "".join(traceback.format_exception(caught.value))
    assert "approle" in rendered
    assert wrong_secret_id not in rendered
    assert caught.value.__cause__ is None


def test_missing_kubernetes_token_file_names_path(vault: FakeVault, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-token")

    with pytest.raises(SecretBackendError) as caught:
        connect(vault, KubernetesAuth(K8S_ROLE, token_path=missing))

    assert missing in str(caught.value)
    assert "ARBOR_VAULT_K8S_TOKEN_PATH" in str(caught.value)


def test_unreachable_vault_names_address() -> None:
    server = FakeVault().start()
    url = server.url
    server.stop()

    with pytest.raises(SecretBackendError) as caught:
        VaultSecretProvider(url, AppRoleAuth(ROLE_ID, SECRET_ID), timeout_s=2)

    assert url in str(caught.value)
    assert "approle" in str(caught.value)
    assert SECRET_ID not in str(caught.value)


def test_missing_secret_names_path(vault: FakeVault) -> None:
    with (
        connect(vault, TokenAuth(vault.issue_token())) as provider,
        pytest.raises(SecretNotFound) as caught,
    ):
        provider.read("payments/api_key")

    assert caught.value.path == "payments/api_key"
    assert "'payments/api_key'" in str(caught.value)
    assert "secret/payments" in str(caught.value)


def test_missing_field_names_field_and_existing_fields(vault: FakeVault) -> None:
    with (
        connect(vault, TokenAuth(vault.issue_token())) as provider,
        pytest.raises(SecretNotFound) as caught,
    ):
        provider.read("db/username")

    message = str(caught.value)
    assert "'db/username'" in message
    assert "field 'username'" in message
    assert "password" in message
    assert DB_PASSWORD not in message


def test_non_string_field_is_rejected_without_value(vault: FakeVault) -> None:
    with (
        connect(vault, TokenAuth(vault.issue_token())) as provider,
        pytest.raises(SecretError) as caught,
    ):
        provider.read("db/port")

    assert "is a int, expected a string" in str(caught.value)
    assert "5432" not in str(caught.value)


@pytest.mark.parametrize(
    "path",
    [
        "db",
        "",
        "db/",
        "/db/password",
        "db//password",
        "../db/password",
        "db/./password",
        "db/pass word",
        "db/pass%2Fword",
    ],
)
def test_invalid_secret_path_is_rejected(vault: FakeVault, path: str) -> None:
    with (
        connect(vault, TokenAuth(vault.issue_token())) as provider,
        pytest.raises(InvalidSecretPath) as caught,
    ):
        provider.read(path)

    assert repr(path) in str(caught.value)
    assert vault.count("GET", "/v1/secret/data/db") == 0


def test_split_secret_path_separates_field() -> None:
    assert split_secret_path("db/password") == ("db", "password")
    assert split_secret_path("a/b.c/d-e_f") == ("a/b.c", "d-e_f")


def test_policy_denial_names_path_not_value(vault: FakeVault) -> None:
    token = vault.issue_token(ttl=TTL_S)
    with connect(vault, TokenAuth(token)) as provider:
        vault.revoke(token)
        with pytest.raises(SecretBackendError) as caught:
            provider.read("db/password")

    message = str(caught.value)
    assert "'db/password'" in message
    assert "permission denied" in message
    assert token not in message
    assert DB_PASSWORD not in message


# --- renewal and fresh login ------------------------------------------------------------


def test_token_renewed_before_expiry(vault: FakeVault) -> None:
    with connect(vault, AppRoleAuth(ROLE_ID, SECRET_ID)) as provider:
        vault.clock.advance(30)  # half the lease: not due yet
        settle()
        assert vault.count("POST", "/v1/auth/token/renew-self") == 0

        vault.clock.advance(15)  # 45 s is past two thirds of the 60 s lease
        assert wait_for(lambda: vault.count("POST", "/v1/auth/token/renew-self") == 1)

        # The first lease would have ended at 60 s; the renewed one runs to 105 s.
        vault.clock.advance(20)
        assert provider.read("db/password").reveal() == DB_PASSWORD

    assert vault.count("POST", "/v1/auth/approle/login") == 1


def test_fresh_login_at_max_ttl(vault: FakeVault) -> None:
    with connect(vault, AppRoleAuth(ROLE_ID, SECRET_ID)) as provider:
        first_token = vault.issued_tokens()[0]

        # At 41 s the renewal is capped at the 100 s max TTL (59 s lease, not 60 s).
        vault.clock.advance(41)
        assert wait_for(lambda: vault.count("POST", "/v1/auth/token/renew-self") == 1)
        settle()
        assert vault.count("POST", "/v1/auth/approle/login") == 1

        # Two thirds of the 59 s capped lease later (80.3 s) the provider logs in afresh.
        vault.clock.advance(40)
        assert wait_for(lambda: vault.count("POST", "/v1/auth/approle/login") == 2)
        assert vault.count("POST", "/v1/auth/token/renew-self") == 1

        # Past the first token's max TTL the new token still reads, with no extra login.
        vault.clock.advance(25)
        assert vault.token_ttl(first_token) is None
        assert provider.read("db/password").reveal() == DB_PASSWORD
        # The new token's lease runs from the login at 81 s.
        assert provider.token_expires_at == pytest.approx(vault.clock() - 25 + TTL_S)

    assert vault.count("POST", "/v1/auth/approle/login") == 2


def test_failed_renewal_logs_in_again(vault: FakeVault, jwt_file: str) -> None:
    with connect(vault, KubernetesAuth(K8S_ROLE, token_path=jwt_file)):
        vault.revoke_all()
        vault.clock.advance(41)
        assert wait_for(lambda: vault.count("POST", "/v1/auth/kubernetes/login") == 2)

    assert vault.count("POST", "/v1/auth/token/renew-self") == 1
    assert len(vault.issued_tokens()) == 1


def test_failed_login_is_retried(vault: FakeVault) -> None:
    with connect(vault, AppRoleAuth(ROLE_ID, SECRET_ID), retry_interval_s=5) as provider:
        vault.revoke_all()
        vault.add_approle(ROLE_ID, "rotated-secret-id", ttl=TTL_S, max_ttl=MAX_TTL_S)
        vault.clock.advance(41)
        assert wait_for(lambda: vault.count("POST", "/v1/auth/approle/login") == 2)

        # The retry waits retry_interval_s on the provider's clock, then tries again.
        vault.clock.advance(5)
        assert wait_for(lambda: vault.count("POST", "/v1/auth/approle/login") == 3)
        assert provider.token_expires_at is not None


def test_token_auth_renews_without_login(vault: FakeVault) -> None:
    token = vault.issue_token(ttl=TTL_S)
    with connect(vault, TokenAuth(token)) as provider:
        for _ in range(3):
            vault.clock.advance(45)
            renewals = vault.count("POST", "/v1/auth/token/renew-self")
            assert wait_for(
                lambda before=renewals: (
                    vault.count("POST", "/v1/auth/token/renew-self") == before + 1
                )
            )
        assert provider.read("db/password").reveal() == DB_PASSWORD

    remaining = vault.token_ttl(token)
    assert remaining is not None
    assert remaining > 0


def test_token_without_ttl_is_not_renewed(vault: FakeVault) -> None:
    with connect(vault, TokenAuth(vault.issue_token())) as provider:
        vault.clock.advance(10_000)
        settle()
        assert provider.token_expires_at is None

    assert vault.count("POST", "/v1/auth/token/renew-self") == 0


def test_read_after_expiry_logs_in_again(vault: FakeVault) -> None:
    # A check interval of 1000 s keeps the renewal thread asleep, as after a long pause.
    with connect(vault, AppRoleAuth(ROLE_ID, SECRET_ID), check_interval_s=1000) as provider:
        vault.clock.advance(MAX_TTL_S + 1)
        assert provider.read("db/password").reveal() == DB_PASSWORD

    assert vault.count("POST", "/v1/auth/approle/login") == 2


def test_close_stops_renewal_thread(vault: FakeVault) -> None:
    provider = connect(vault, AppRoleAuth(ROLE_ID, SECRET_ID))
    name = "arbor-vault-renewal-approle"
    assert any(thread.name == name for thread in threading.enumerate())

    provider.close()
    provider.close()  # a second close does nothing
    vault.clock.advance(45)
    settle()

    assert not any(thread.name == name for thread in threading.enumerate())
    assert vault.count("POST", "/v1/auth/token/renew-self") == 0


# --- environment and chain --------------------------------------------------------------


def test_env_variable_name_mapping() -> None:
    assert env_variable_name("db/password") == "ARBOR_SECRET_DB_PASSWORD"
    assert env_variable_name("cluster/signing-key") == "ARBOR_SECRET_CLUSTER_SIGNING_KEY"
    assert env_variable_name("apps/billing.v2/token") == "ARBOR_SECRET_APPS_BILLING_V2_TOKEN"


def test_env_provider_reads_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARBOR_SECRET_DB_PASSWORD", "from-env-91")

    assert EnvSecretProvider().read("db/password").reveal() == "from-env-91"


def test_env_provider_missing_names_variable() -> None:
    with pytest.raises(SecretNotFound) as caught:
        EnvSecretProvider(environ={}).read("db/password")

    assert "'db/password'" in str(caught.value)
    assert "ARBOR_SECRET_DB_PASSWORD" in str(caught.value)


def test_chain_prefers_vault(vault: FakeVault) -> None:
    environ = {"ARBOR_SECRET_DB_PASSWORD": "from-env-91"}
    vault_provider = connect(vault, TokenAuth(vault.issue_token()))
    with ChainSecretProvider([vault_provider, EnvSecretProvider(environ)]) as chain:
        assert chain.read("db/password").reveal() == DB_PASSWORD


def test_chain_falls_back_to_env(vault: FakeVault) -> None:
    environ = {"ARBOR_SECRET_PAYMENTS_API_KEY": "from-env-42"}
    vault_provider = connect(vault, TokenAuth(vault.issue_token()))
    with ChainSecretProvider([vault_provider, EnvSecretProvider(environ)]) as chain:
        assert chain.read("payments/api_key").reveal() == "from-env-42"


def test_chain_falls_back_when_vault_is_down(
    vault: FakeVault, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {"ARBOR_SECRET_DB_PASSWORD": "from-env-91"}
    vault_provider = connect(vault, TokenAuth(vault.issue_token()), timeout_s=2)
    with ChainSecretProvider([vault_provider, EnvSecretProvider(environ)]) as chain:
        vault.stop()
        with caplog.at_level(logging.WARNING, logger="arbor.security.secrets"):
            assert chain.read("db/password").reveal() == "from-env-91"

    assert "vault provider failed" in caplog.text
    assert "trying the env provider" in caplog.text


def test_chain_not_found_lists_each_provider(vault: FakeVault) -> None:
    vault_provider = connect(vault, TokenAuth(vault.issue_token()))
    chain = ChainSecretProvider([vault_provider, EnvSecretProvider({})])
    with chain, pytest.raises(SecretNotFound) as caught:
        chain.read("payments/api_key")

    message = str(caught.value)
    assert "vault: Vault at" in message
    assert "env: environment variable ARBOR_SECRET_PAYMENTS_API_KEY is not set" in message


def test_chain_needs_a_provider() -> None:
    with pytest.raises(ValueError, match="at least one provider"):
        ChainSecretProvider([])


# --- settings -----------------------------------------------------------------------------


def test_provider_from_settings_builds_each_kind(vault: FakeVault, jwt_file: str) -> None:
    env = provider_from_settings(Settings(secret_provider="env"))
    assert isinstance(env, EnvSecretProvider)

    approle = Settings(
        secret_provider="vault",
        vault_url=vault.url,
        vault_auth="approle",
        vault_role_id=ROLE_ID,
        vault_secret_id=SECRET_ID,
    )
    with provider_from_settings(approle) as provider:
        assert isinstance(provider, VaultSecretProvider)
        assert provider.read("db/password").reveal() == DB_PASSWORD

    kubernetes = Settings(
        secret_provider="vault+env",
        vault_url=vault.url,
        vault_auth="kubernetes",
        vault_k8s_role=K8S_ROLE,
        vault_k8s_token_path=jwt_file,
    )
    with provider_from_settings(kubernetes) as provider:
        assert isinstance(provider, ChainSecretProvider)
        assert provider.read("db/password").reveal() == DB_PASSWORD


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"secret_provider": "vault"}, "needs ARBOR_VAULT_URL"),
        ({"secret_provider": "vault", "vault_url": "http://127.0.0.1:1"}, "ARBOR_VAULT_TOKEN"),
        (
            {
                "secret_provider": "vault",
                "vault_url": "http://127.0.0.1:1",
                "vault_auth": "approle",
            },
            "ARBOR_VAULT_SECRET_ID",
        ),
        (
            {
                "secret_provider": "vault",
                "vault_url": "http://127.0.0.1:1",
                "vault_auth": "kubernetes",
            },
            "ARBOR_VAULT_K8S_ROLE",
        ),
        (
            {"secret_provider": "vault", "vault_url": "127.0.0.1:8200", "vault_token": "t"},
            "https://",
        ),
    ],
)
def test_incomplete_vault_settings_rejected(fields: dict[str, str], expected: str) -> None:
    with pytest.raises(ArborError, match=expected):
        provider_from_settings(Settings(**fields))  # type: ignore[arg-type]


def test_settings_repr_hides_vault_credentials() -> None:
    settings = Settings(vault_token="hvs.settings-token-77", vault_secret_id=SECRET_ID)

    assert "hvs.settings-token-77" not in repr(settings)
    assert SECRET_ID not in repr(settings)
    assert settings.vault_token is not None
    assert settings.vault_token.get_secret_value() == "hvs.settings-token-77"


def test_resolve_database_url_injects_password() -> None:
    password = "p@ss/w:rd%&?"
    settings = Settings(
        database_url="postgresql://arbor@127.0.0.1:5432/arbor?sslmode=verify-full",
        database_password_secret="db/password",
    )
    provider = EnvSecretProvider({"ARBOR_SECRET_DB_PASSWORD": password})

    url = resolve_database_url(settings, provider)

    parsed = psycopg.conninfo.conninfo_to_dict(url)
    assert parsed["password"] == password
    assert parsed["user"] == "arbor"
    assert parsed["host"] == "127.0.0.1"
    assert parsed["dbname"] == "arbor"
    assert parsed["sslmode"] == "verify-full"


def test_resolve_database_url_without_setting_is_unchanged() -> None:
    settings = Settings(database_url="postgresql://arbor@db/arbor")

    assert resolve_database_url(settings, EnvSecretProvider({})) == "postgresql://arbor@db/arbor"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///arbor.db", "not a postgresql:// URL"),
        ("postgresql://arbor:old-pw-3@db/arbor", "already contains a password"),
        ("postgresql://arbor@db/arbor?password=old-pw-3", "already contains a password"),
        ("postgresql://db/arbor", "has no user name"),
    ],
)
def test_resolve_database_url_rejects_conflicts(url: str, expected: str) -> None:
    settings = Settings(database_url=url, database_password_secret="db/password")
    provider = EnvSecretProvider({"ARBOR_SECRET_DB_PASSWORD": "new-pw-8"})

    with pytest.raises(ArborError, match=expected) as caught:
        resolve_database_url(settings, provider)

    assert "old-pw-3" not in str(caught.value)
    assert "new-pw-8" not in str(caught.value)


def test_signing_key_decodes_hex(vault: FakeVault) -> None:
    key_hex = "0f" * 32
    vault.put("cluster", {"signing_key": key_hex})
    settings = Settings(signing_key_secret="cluster/signing_key")

    with connect(vault, TokenAuth(vault.issue_token())) as provider:
        key = signing_key(settings, provider)

    assert key == bytes.fromhex(key_hex)
    assert signing_key(Settings(), EnvSecretProvider({})) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("zz-not-hex-signing-key-value", "not hex-encoded"), ("ab" * 16, "is 16 bytes long")],
)
def test_bad_signing_key_hides_value(value: str, expected: str) -> None:
    settings = Settings(signing_key_secret="cluster/signing_key")
    provider = EnvSecretProvider({"ARBOR_SECRET_CLUSTER_SIGNING_KEY": value})

    with pytest.raises(SecretError, match=expected) as caught:
        signing_key(settings, provider)

    assert value not in str(caught.value)
    assert caught.value.__cause__ is None


# --- the Secret wrapper ---------------------------------------------------------------------


def test_secret_repr_and_str_hide_value() -> None:
    secret = Secret("db/password", DB_PASSWORD)

    assert repr(secret) == "Secret('db/password', ***)"
    assert str(secret) == "Secret('db/password', ***)"
    assert f"{secret}" == "Secret('db/password', ***)"
    assert DB_PASSWORD not in repr([secret, {"key": secret}])


def test_secret_cannot_be_pickled_or_json_encoded() -> None:
    secret = Secret("db/password", DB_PASSWORD)

    with pytest.raises(TypeError) as pickled:
        pickle.dumps(secret)
    with pytest.raises(TypeError) as encoded:
        json.dumps({"state": secret})

    assert DB_PASSWORD not in str(pickled.value)
    assert DB_PASSWORD not in str(encoded.value)


def test_secret_equality_and_copy() -> None:
    secret = Secret("db/password", DB_PASSWORD)

    assert secret == Secret("db/password", DB_PASSWORD)
    assert secret != Secret("db/password", "other")
    assert secret != Secret("db/other", DB_PASSWORD)
    assert copy.deepcopy(secret).reveal() == DB_PASSWORD
    with pytest.raises(TypeError):
        hash(secret)


def test_logs_never_contain_secrets(
    vault: FakeVault, jwt_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logger = logging.getLogger("tests.secrets")

    with connect(vault, AppRoleAuth(ROLE_ID, SECRET_ID)) as provider:
        secret = provider.read("db/password")
        logger.info("read %s", secret)
        logger.info("read %r", secret)
        vault.clock.advance(41)  # renewal, capped at the max TTL
        assert wait_for(lambda: vault.count("POST", "/v1/auth/token/renew-self") == 1)
        vault.clock.advance(40)  # fresh login
        assert wait_for(lambda: vault.count("POST", "/v1/auth/approle/login") == 2)
        vault.revoke_all()
        vault.clock.advance(41)  # failed renewal, then a login
        assert wait_for(lambda: vault.count("POST", "/v1/auth/approle/login") == 3)
        with pytest.raises(SecretNotFound):
            provider.read("db/username")
    with connect(vault, KubernetesAuth(K8S_ROLE, token_path=jwt_file)) as provider:
        provider.read("db/password")

    assert "renewed the Vault token" in caplog.text or "max TTL" in caplog.text
    assert "logged in to Vault" in caplog.text
    assert "Secret('db/password', ***)" in caplog.text
    for value in [DB_PASSWORD, SECRET_ID, K8S_JWT, *vault.issued_tokens()]:
        assert value not in caplog.text
    assert repr(provider).startswith("VaultSecretProvider(")
    assert SECRET_ID not in repr(AppRoleAuth(ROLE_ID, SECRET_ID))
