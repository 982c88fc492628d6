"""Secret providers: environment variables, HashiCorp Vault, and a chain of both.

A secret path has two or more segments, ``<secret>/<field>``: the last segment names a
field and the rest names the secret that contains it. ``db/password`` is the ``password``
field of the secret ``db``, which Vault's CLI writes with ``vault kv put -mount=secret db
password=...`` and the environment provider reads from ``ARBOR_SECRET_DB_PASSWORD``.

Every value comes back wrapped in `Secret`, whose repr and str show only the path, so a
value that reaches a log line, an exception or a checkpoint by accident stays hidden.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

from arbor.errors import (
    ArborError,
    InvalidSecretPath,
    SecretBackendError,
    SecretError,
    SecretNotFound,
)

if TYPE_CHECKING:
    from arbor.config import Settings

logger = logging.getLogger(__name__)

ENV_PREFIX = "ARBOR_SECRET_"

# A signing key shorter than 256 bits is rejected: that is the key size of Ed25519 and
# of HMAC-SHA256, the two uses a cluster key has.
MIN_SIGNING_KEY_BYTES = 32

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class Secret:
    """A secret value that its repr and str never show.

    ``repr(Secret("db/password", "s3cret"))`` is ``Secret('db/password', ***)``. Call
    `reveal` at the one place that needs the value. A `Secret` cannot be pickled, so
    it never travels to another Ray process or into the object store by accident.
    """

    __slots__ = ("_path", "_value")

    def __init__(self, path: str, value: str) -> None:
        self._path = path
        self._value = value

    @property
    def path(self) -> str:
        """The secret path this value was read from."""
        return self._path

    def reveal(self) -> str:
        """Return the secret value itself."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self._path!r}, ***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # A constant-time comparison, so the time taken does not reveal a common prefix.
        same_value = hmac.compare_digest(self._value.encode(), other._value.encode())
        return self._path == other._path and same_value

    __hash__ = None  # type: ignore[assignment]

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: object) -> Secret:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            f"{self!r} cannot be pickled: secret values stay in the process that read "
            "them, so send the path and read it again where it is needed"
        )


def split_secret_path(path: str) -> tuple[str, str]:
    """Split ``<secret>/<field>`` into the secret path and the field name.

    Raises:
        InvalidSecretPath: the path has fewer than two segments, an empty segment, a
            ``.`` or ``..`` segment, or characters other than letters, digits, ``_``,
            ``-`` and ``.``.
    """
    if not isinstance(path, str):
        raise InvalidSecretPath(f"secret path must be a string, got {type(path).__name__}")
    segments = path.split("/")
    if len(segments) < 2:
        raise InvalidSecretPath(
            f"secret path {path!r} has no field: use <secret>/<field>, for example db/password"
        )
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise InvalidSecretPath(
                f"secret path {path!r} has an invalid segment {segment!r}: segments are "
                "non-empty, start with a letter, digit or _, and contain only letters, "
                "digits, _, - and ."
            )
    return "/".join(segments[:-1]), segments[-1]


def env_variable_name(path: str, prefix: str = ENV_PREFIX) -> str:
    """Return the name of the environment variable for ``path``.

    The path is upper-cased and each ``/``, ``-`` and ``.`` becomes ``_``, so
    ``db/password`` maps to ``ARBOR_SECRET_DB_PASSWORD``. Paths that differ only in
    those characters or in case map to the same variable.
    """
    split_secret_path(path)
    return prefix + re.sub(r"[/.-]", "_", path).upper()


class SecretProvider:
    """Interface of a secret source: `read` a path, `close` when done."""

    name = "provider"

    def read(self, path: str) -> Secret:
        """Read the secret at ``path``.

        Raises:
            InvalidSecretPath: ``path`` is not ``<secret>/<field>``.
            SecretNotFound: the provider has no secret at ``path``.
            SecretBackendError: the backend rejected the credentials or is unreachable.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and stop background threads; later reads may fail."""

    def __enter__(self) -> SecretProvider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class EnvSecretProvider(SecretProvider):
    """Secrets from environment variables: ``db/password`` is ``ARBOR_SECRET_DB_PASSWORD``.

    Args:
        environ: the mapping to read; default `os.environ`, read at each call so that a
            variable set after construction is seen.
        prefix: the variable name prefix.
    """

    name = "env"

    def __init__(self, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> None:
        self._environ = os.environ if environ is None else environ
        self._prefix = prefix

    def read(self, path: str) -> Secret:
        variable = env_variable_name(path, self._prefix)
        value = self._environ.get(variable)
        if value is None:
            raise SecretNotFound(path, f"environment variable {variable} is not set")
        return Secret(path, value)

    def __repr__(self) -> str:
        return f"EnvSecretProvider(prefix={self._prefix!r})"


class ChainSecretProvider(SecretProvider):
    """Secrets from the first provider that has them, for example Vault, then the environment.

    When a provider has no secret at the path or its backend fails, the next provider
    reads it, and a failing backend is logged as a warning. A path that no provider has
    raises `SecretNotFound` listing where each provider looked.
    """

    name = "chain"

    def __init__(self, providers: Sequence[SecretProvider]) -> None:
        if not providers:
            raise ValueError("ChainSecretProvider needs at least one provider")
        self._providers = list(providers)

    def read(self, path: str) -> Secret:
        split_secret_path(path)
        details: list[str] = []
        backend_failed = False
        for index, provider in enumerate(self._providers):
            try:
                return provider.read(path)
            except SecretNotFound as error:
                details.append(f"{provider.name}: {error.detail}")
            except SecretBackendError as error:
                backend_failed = True
                details.append(f"{provider.name}: {error}")
                if index + 1 < len(self._providers):
                    logger.warning(
                        "secret %s: %s provider failed (%s); trying the %s provider",
                        path,
                        provider.name,
                        error,
                        self._providers[index + 1].name,
                    )
        summary = "; ".join(details)
        if backend_failed:
            raise SecretBackendError(f"secret {path!r} could not be read: {summary}")
        raise SecretNotFound(path, summary)

    def close(self) -> None:
        for provider in self._providers:
            provider.close()

    def __repr__(self) -> str:
        return f"ChainSecretProvider({self._providers!r})"


def provider_from_settings(settings: Settings | None = None) -> SecretProvider:
    """Build the provider that ``ARBOR_SECRET_PROVIDER`` names: env, vault or vault+env.

    Raises:
        SecretBackendError: Vault rejected the login or could not be reached.
        ArborError: a Vault setting is missing or invalid.
    """
    from arbor.config import get_settings

    settings = settings or get_settings()
    if settings.secret_provider == "env":
        return EnvSecretProvider()

    from arbor.security.vault import VaultSecretProvider

    vault = VaultSecretProvider.from_settings(settings)
    if settings.secret_provider == "vault":
        return vault
    return ChainSecretProvider([vault, EnvSecretProvider()])


def resolve_database_url(settings: Settings, provider: SecretProvider) -> str:
    """Return ``settings.database_url`` with the password read from ``database_password_secret``.

    The URL is returned unchanged when the setting is unset. The result contains the
    password, so log it only through `arbor.config.redact_url`.

    Raises:
        ArborError: the URL is not a PostgreSQL URL with a user name, or it already
            contains a password.
        SecretError: the secret could not be read.
    """
    secret_path = settings.database_password_secret
    url = settings.database_url
    if secret_path is None:
        return url

    from arbor.config import redact_url

    parts = urlsplit(url)
    hint = "set the password in one place only"
    if parts.scheme not in ("postgresql", "postgres"):
        raise ArborError(
            f"ARBOR_DATABASE_PASSWORD_SECRET is set but ARBOR_DATABASE_URL "
            f"{redact_url(url)!r} is not a postgresql:// URL; unset the secret setting"
        )
    if parts.password is not None or re.search(r"(^|&)password=", parts.query):
        raise ArborError(
            f"ARBOR_DATABASE_URL {redact_url(url)!r} already contains a password and "
            f"ARBOR_DATABASE_PASSWORD_SECRET={secret_path} names another; {hint}"
        )
    if not parts.username:
        raise ArborError(
            f"ARBOR_DATABASE_URL {redact_url(url)!r} has no user name to go with the password "
            f"from {secret_path}; write it as postgresql://USER@HOST/DATABASE"
        )
    password = quote(provider.read(secret_path).reveal(), safe="")
    host = parts.netloc.rsplit("@", 1)[1]
    netloc = f"{parts.username}:{password}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def signing_key(settings: Settings, provider: SecretProvider) -> bytes | None:
    """Read the cluster signing key that ``signing_key_secret`` names, or None if unset.

    The secret contains the key hex-encoded.

    Raises:
        SecretError: the secret could not be read, is not hex, or is shorter than 32 bytes.
    """
    secret_path = settings.signing_key_secret
    if secret_path is None:
        return None
    text = provider.read(secret_path).reveal().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        # The message leaves out the value and the position of the bad character.
        raise SecretError(
            f"signing key secret {secret_path!r} is not hex-encoded; store the key as hex, "
            "for example the output of: python -c 'import secrets; print(secrets.token_hex(32))'"
        ) from None
    if len(key) < MIN_SIGNING_KEY_BYTES:
        raise SecretError(
            f"signing key secret {secret_path!r} is {len(key)} bytes long; a signing key needs "
            f"at least {MIN_SIGNING_KEY_BYTES} bytes ({2 * MIN_SIGNING_KEY_BYTES} hex digits)"
        )
    return key
