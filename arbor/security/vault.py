"""HashiCorp Vault secret provider: KV v2 reads through hvac and a token renewal thread.

hvac sends requests and nothing more, so this module keeps the login alive itself. A
daemon thread renews the token when ``renew_fraction`` of its lease has passed. When
Vault grants a shorter lease than requested, the token has reached its max TTL and can
no longer be extended, so the thread logs in afresh before that lease runs out. A failed
renewal also leads to a fresh login. Token auth cannot log in again, so with it the
thread only renews and logs a warning once the token nears its max TTL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests

from arbor.errors import ArborError, SecretBackendError, SecretError, SecretNotFound
from arbor.security.secrets import Secret, SecretProvider, split_secret_path

if TYPE_CHECKING:
    from arbor.config import Settings

logger = logging.getLogger(__name__)

DEFAULT_K8S_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"

# Renew once two thirds of a lease have passed, so the last third leaves time for
# retries while Vault is briefly unreachable.
RENEW_FRACTION = 2 / 3

# Seconds between attempts after a renewal and a login both failed.
RETRY_INTERVAL_S = 5.0

# Maximum sleep, in seconds, of the renewal thread between two looks at the clock. The
# thread sleeps until the renewal is due, but a clock that jumps (an injected test
# clock, a resumed virtual machine) is noticed within this interval.
CHECK_INTERVAL_S = 5.0


@dataclass(frozen=True)
class TokenAuth:
    """Vault token auth: a token issued beforehand, which Arbor renews but cannot replace."""

    token: str = field(repr=False)
    method: ClassVar[str] = "token"
    can_login_again: ClassVar[bool] = False
    settings_hint: ClassVar[str] = "check ARBOR_VAULT_TOKEN"

    def login(self, client: hvac.Client) -> dict[str, Any] | None:
        """Use the token; returns None because there is no login response."""
        client.token = self.token
        return None


@dataclass(frozen=True)
class AppRoleAuth:
    """Vault AppRole auth with a role_id and a secret_id."""

    role_id: str
    secret_id: str = field(repr=False)
    mount: str = "approle"
    method: ClassVar[str] = "approle"
    can_login_again: ClassVar[bool] = True
    settings_hint: ClassVar[str] = "check ARBOR_VAULT_ROLE_ID and ARBOR_VAULT_SECRET_ID"

    def login(self, client: hvac.Client) -> dict[str, Any] | None:
        """Log in and return Vault's response, whose ``auth`` block holds the token."""
        response: dict[str, Any] = client.auth.approle.login(
            role_id=self.role_id, secret_id=self.secret_id, mount_point=self.mount
        )
        return response


@dataclass(frozen=True)
class KubernetesAuth:
    """Vault Kubernetes auth with the pod's service account JWT.

    The JWT file is read at every login because the kubelet rotates projected tokens.
    """

    role: str
    token_path: str = DEFAULT_K8S_TOKEN_PATH
    mount: str = "kubernetes"
    method: ClassVar[str] = "kubernetes"
    can_login_again: ClassVar[bool] = True
    settings_hint: ClassVar[str] = (
        "check ARBOR_VAULT_K8S_ROLE and that the role binds this pod's service account"
    )

    def login(self, client: hvac.Client) -> dict[str, Any] | None:
        """Read the JWT, log in, and return Vault's response."""
        try:
            with open(self.token_path, encoding="utf-8") as file:
                jwt = file.read().strip()
        except OSError as error:
            raise SecretBackendError(
                f"Vault kubernetes login cannot read the service account token "
                f"{self.token_path}: {error.strerror}; set ARBOR_VAULT_K8S_TOKEN_PATH to the "
                "mounted token file"
            ) from None
        response: dict[str, Any] = client.auth.kubernetes.login(
            role=self.role, jwt=jwt, mount_point=self.mount
        )
        return response


VaultAuth = TokenAuth | AppRoleAuth | KubernetesAuth


class VaultSecretProvider(SecretProvider):
    """Secrets from Vault's KV v2 engine; ``db/password`` is field ``password`` of ``db``.

    The constructor logs in at once, so bad credentials fail at start-up, and starts the
    renewal thread, which does nothing while the token has no TTL. Call `close` to stop it.

    Args:
        url: Vault address, ``http://`` or ``https://``.
        auth: `TokenAuth`, `AppRoleAuth` or `KubernetesAuth`.
        mount: mount path of the KV v2 engine.
        namespace: Vault Enterprise namespace, or None.
        ca_cert: CA bundle file for Vault's TLS certificate; None uses the system store.
        timeout_s: timeout of each request, in seconds.
        renew_fraction: fraction of a lease after which the token is renewed, in (0, 1).
        retry_interval_s: seconds between attempts after renewal and login failed.
        check_interval_s: maximum sleep of the renewal thread between clock checks.
        clock: seconds on a monotonic scale; tests pass the fake server's clock.

    Raises:
        SecretBackendError: the login failed or Vault is unreachable.
        ArborError: an argument is invalid.

    Example:
        >>> vault = VaultSecretProvider("https://vault:8200", AppRoleAuth(role, secret))
        >>> password = vault.read("db/password").reveal()
    """

    name = "vault"

    def __init__(
        self,
        url: str,
        auth: VaultAuth,
        *,
        mount: str = "secret",
        namespace: str | None = None,
        ca_cert: str | None = None,
        timeout_s: float = 10.0,
        renew_fraction: float = RENEW_FRACTION,
        retry_interval_s: float = RETRY_INTERVAL_S,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ArborError(f"Vault URL {url!r} must start with https:// or http://")
        if not 0 < renew_fraction < 1:
            raise ArborError(f"renew_fraction {renew_fraction} must be between 0 and 1")
        self.url = url
        self.auth = auth
        self.mount = mount
        self._renew_fraction = renew_fraction
        self._retry_interval_s = retry_interval_s
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._client = hvac.Client(
            url=url, namespace=namespace, verify=ca_cert or True, timeout=timeout_s
        )
        # One lock for the hvac client and the lease fields: the renewal thread and
        # readers both use them, and a reader may log in again after a 403.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._full_lease_s = 0.0
        self._expires_at: float | None = None
        self._due_at: float | None = None
        self._login_due = False
        self._closed = False

        self._login()
        self._thread = threading.Thread(
            target=self._run, name=f"arbor-vault-renewal-{auth.method}", daemon=True
        )
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultSecretProvider:
        """Build the provider from the ``ARBOR_VAULT_*`` settings.

        Raises:
            ArborError: a setting the chosen auth method needs is unset.
            SecretBackendError: the login failed.
        """
        if not settings.vault_url:
            raise ArborError(
                f"ARBOR_SECRET_PROVIDER={settings.secret_provider} needs ARBOR_VAULT_URL"
            )
        auth: VaultAuth
        mount = settings.vault_auth_mount
        if settings.vault_auth == "token":
            if settings.vault_token is None:
                raise ArborError("ARBOR_VAULT_AUTH=token needs ARBOR_VAULT_TOKEN")
            auth = TokenAuth(settings.vault_token.get_secret_value())
        elif settings.vault_auth == "approle":
            if not settings.vault_role_id or settings.vault_secret_id is None:
                raise ArborError(
                    "ARBOR_VAULT_AUTH=approle needs ARBOR_VAULT_ROLE_ID and ARBOR_VAULT_SECRET_ID"
                )
            auth = AppRoleAuth(
                settings.vault_role_id,
                settings.vault_secret_id.get_secret_value(),
                mount=mount or "approle",
            )
        else:
            if not settings.vault_k8s_role:
                raise ArborError("ARBOR_VAULT_AUTH=kubernetes needs ARBOR_VAULT_K8S_ROLE")
            auth = KubernetesAuth(
                settings.vault_k8s_role,
                token_path=settings.vault_k8s_token_path,
                mount=mount or "kubernetes",
            )
        return cls(
            settings.vault_url,
            auth,
            mount=settings.vault_mount,
            namespace=settings.vault_namespace,
            ca_cert=settings.vault_ca_cert,
            timeout_s=settings.vault_timeout_s,
        )

    def read(self, path: str) -> Secret:
        secret_path, key = split_secret_path(path)
        try:
            response = self._read_kv(path, secret_path)
        except hvac.exceptions.Forbidden:
            if not self.auth.can_login_again:
                raise self._read_error(path, "permission denied") from None
            # The token may have expired between renewals: log in once and read again.
            logger.warning(
                "Vault at %s denied reading %s; logging in again with %s auth",
                self.url,
                path,
                self.auth.method,
            )
            with self._lock:
                self._login()
            try:
                response = self._read_kv(path, secret_path)
            except hvac.exceptions.Forbidden:
                raise self._read_error(path, "permission denied after a fresh login") from None

        data = response.get("data", {}).get("data") or {}
        if key not in data:
            raise SecretNotFound(
                path,
                f"Vault secret {self.mount}/{secret_path} at {self.url} has no field {key!r} "
                f"(fields: {', '.join(sorted(data)) or 'none'})",
            )
        value = data[key]
        if not isinstance(value, str):
            raise SecretError(
                f"Vault secret {self.mount}/{secret_path} field {key!r} is a "
                f"{type(value).__name__}, expected a string; store it as text"
            )
        return Secret(path, value)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._check_interval_s + 30)
        with self._lock:
            self._client.adapter.close()

    @property
    def token_expires_at(self) -> float | None:
        """When the current token expires on ``clock``'s scale, or None if it never does."""
        return self._expires_at

    def __repr__(self) -> str:
        return f"VaultSecretProvider({self.url!r}, auth={self.auth.method!r}, mount={self.mount!r})"

    def _read_kv(self, path: str, secret_path: str) -> dict[str, Any]:
        """Read one KV v2 secret, turning hvac and connection errors into Arbor errors.

        `hvac.exceptions.Forbidden` passes through so that `read` can log in again.
        """
        try:
            with self._lock:
                response: dict[str, Any] = self._client.secrets.kv.v2.read_secret_version(
                    path=secret_path, mount_point=self.mount, raise_on_deleted_version=True
                )
        except hvac.exceptions.InvalidPath:
            raise SecretNotFound(
                path,
                f"Vault at {self.url} has no secret {self.mount}/{secret_path}",
            ) from None
        except hvac.exceptions.Forbidden:
            raise
        except (hvac.exceptions.VaultError, requests.RequestException) as error:
            raise SecretBackendError(
                f"reading {self.mount}/{secret_path} from Vault at {self.url} failed: "
                f"{_describe(error)}; check ARBOR_VAULT_URL and that Vault is unsealed"
            ) from None
        return response

    def _read_error(self, path: str, reason: str) -> SecretBackendError:
        return SecretBackendError(
            f"Vault at {self.url} rejected reading secret {path!r} with {self.auth.method} "
            f"auth ({reason}); grant read on {self.mount}/data/{split_secret_path(path)[0]} "
            "in the policy of the login's role"
        )

    def _login(self) -> None:
        """Log in (or look the token up) and schedule the next renewal; hold the lock."""
        started_at = self._clock()
        try:
            response = self.auth.login(self._client)
            if response is None:
                data = self._client.auth.token.lookup_self()["data"]
                lease_s = float(data.get("ttl") or 0)
                full_lease_s = float(data.get("creation_ttl") or lease_s)
                renewable = bool(data.get("renewable"))
            else:
                block = response["auth"]
                lease_s = full_lease_s = float(block.get("lease_duration") or 0)
                renewable = bool(block.get("renewable"))
        except (hvac.exceptions.VaultError, requests.RequestException) as error:
            raise SecretBackendError(
                f"Vault {self.auth.method} login at {self.url} failed: {_describe(error)}; "
                f"{self.auth.settings_hint}"
            ) from None

        self._full_lease_s = full_lease_s
        # A token that cannot be renewed is replaced by a new login at the renewal time.
        self._login_due = not renewable
        self._schedule(lease_s, started_at)
        logger.info(
            "logged in to Vault at %s with %s auth; token lease %.0f s, renewable %s",
            self.url,
            self.auth.method,
            lease_s,
            renewable,
        )

    def _schedule(self, lease_s: float, started_at: float) -> None:
        """Set the expiry and the renewal time of a lease that Vault granted.

        The lease is counted from ``started_at``, the time the request was sent, which
        is never later than the time Vault granted it.
        """
        if lease_s <= 0:
            # A token without a TTL, such as a root token, never expires.
            self._expires_at = self._due_at = None
            return
        self._expires_at = started_at + lease_s
        self._due_at = started_at + lease_s * self._renew_fraction

    def _run(self) -> None:
        while not self._stop.is_set():
            due_at = self._due_at
            wait_s = self._check_interval_s
            if due_at is not None:
                wait_s = min(wait_s, max(0.0, due_at - self._clock()))
            if self._stop.wait(wait_s):
                return
            due_at = self._due_at
            if due_at is None or self._clock() < due_at:
                continue
            try:
                with self._lock:
                    self._renew_or_login()
            except Exception:
                # The thread must survive anything, or the token would silently expire.
                logger.exception(
                    "Vault renewal thread for %s failed; retrying in %.0f s",
                    self.url,
                    self._retry_interval_s,
                )
                self._due_at = self._clock() + self._retry_interval_s

    def _renew_or_login(self) -> None:
        if self._login_due and self.auth.can_login_again:
            self._login_or_retry()
            return
        started_at = self._clock()
        try:
            response = self._client.auth.token.renew_self(increment=int(self._full_lease_s))
            lease_s = float(response["auth"]["lease_duration"])
        except (hvac.exceptions.VaultError, requests.RequestException) as error:
            if self.auth.can_login_again:
                logger.warning(
                    "Vault token renewal at %s failed (%s); logging in again with %s auth",
                    self.url,
                    _describe(error),
                    self.auth.method,
                )
                self._login_or_retry()
            else:
                logger.error(
                    "Vault token renewal at %s failed (%s); retrying in %.0f s",
                    self.url,
                    _describe(error),
                    self._retry_interval_s,
                )
                self._due_at = started_at + self._retry_interval_s
            return

        self._schedule(lease_s, started_at)
        if lease_s >= self._full_lease_s:
            logger.debug("renewed the Vault token at %s for %.0f s", self.url, lease_s)
            return
        # Vault caps a renewal at the token's max TTL, so a shorter lease means this
        # token has reached it and only a new login gives a usable token.
        self._login_due = True
        if self.auth.can_login_again:
            logger.info(
                "Vault token at %s reaches its max TTL in %.0f s; logging in again before then",
                self.url,
                lease_s,
            )
        else:
            logger.warning(
                "Vault token at %s reaches its max TTL in %.0f s and token auth cannot log in "
                "again; set a new ARBOR_VAULT_TOKEN and restart before then",
                self.url,
                lease_s,
            )

    def _login_or_retry(self) -> None:
        started_at = self._clock()
        try:
            self._login()
        except SecretBackendError as error:
            logger.error("%s; retrying in %.0f s", error, self._retry_interval_s)
            self._login_due = True
            self._due_at = started_at + self._retry_interval_s


def _describe(error: BaseException) -> str:
    """Return the error class and Vault's error list; hvac errors carry no secret values."""
    if isinstance(error, hvac.exceptions.VaultError):
        errors = error.errors
        if isinstance(errors, str):
            errors = [errors]
        detail = ", ".join(errors) if errors else "no detail from Vault"
        return f"{type(error).__name__}: {detail}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}"
