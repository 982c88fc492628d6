"""A small Vault-compatible HTTP server for the secret provider tests.

No Vault server can be installed on these machines, so the tests run hvac against this
Vault-compatible server that implements the KV v2 and auth endpoints Arbor uses:

- ``GET`` and ``POST /v1/<mount>/data/<path>``: read and write a KV v2 secret.
- ``GET /v1/auth/token/lookup-self`` and ``POST /v1/auth/token/renew-self``.
- ``POST /v1/auth/<approle mount>/login`` with ``role_id`` and ``secret_id``.
- ``POST /v1/auth/<kubernetes mount>/login`` with ``role`` and ``jwt``.

Response bodies follow the shapes in Vault's HTTP API documentation, and errors come as
``{"errors": [...]}`` with the status codes Vault uses (400, 403, 404), which hvac turns
into its exception classes. Time is a `FakeClock` that tests move forward, so a token's
TTL and max TTL run out without sleeping. The server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeClock:
    """Seconds that move only when a test calls `advance`; thread-safe."""

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        with self._lock:
            self._now += seconds


@dataclass
class Token:
    """A token the server issued; ``ttl`` 0 means it never expires."""

    value: str
    ttl: int
    max_ttl: int
    issued_at: float
    expires_at: float
    renewable: bool
    policies: list[str]
    path: str
    accessor: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Role:
    """An AppRole or Kubernetes role: the credential it accepts and its token TTLs."""

    credential: str
    ttl: int
    max_ttl: int
    renewable: bool = True


class FakeVault:
    """The server and its state; use as a context manager or call `start` and `stop`.

    Attributes:
        clock: the server's time; move it with ``clock.advance``.
        requests: ``(method, path)`` of every request, in order.
    """

    def __init__(self, kv_mount: str = "secret") -> None:
        self.clock = FakeClock()
        self.kv_mount = kv_mount
        self.requests: list[tuple[str, str]] = []
        self.approle_mount = "approle"
        self.kubernetes_mount = "kubernetes"
        self._kv: dict[str, list[dict[str, Any]]] = {}
        self._tokens: dict[str, Token] = {}
        self._approles: dict[str, Role] = {}
        self._k8s_roles: dict[str, Role] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- set-up -------------------------------------------------------------------

    def start(self) -> FakeVault:
        """Start serving on 127.0.0.1 on a free port."""
        handler = type("Handler", (_Handler,), {"vault": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # A short poll keeps stop() quick; the default waits up to 0.5 s.
            kwargs={"poll_interval": 0.05},
            name="fake-vault",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeVault:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The server's base address, ``http://127.0.0.1:<port>``."""
        assert self._server is not None, "FakeVault is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def issue_token(
        self,
        ttl: int = 0,
        max_ttl: int = 0,
        renewable: bool = True,
        policies: list[str] | None = None,
    ) -> str:
        """Create a token as ``vault token create`` would and return its value."""
        with self._lock:
            return self._issue(
                ttl, max_ttl, renewable, policies or ["default"], "auth/token/create"
            )

    def add_approle(self, role_id: str, secret_id: str, ttl: int, max_ttl: int) -> None:
        """Accept AppRole logins with this role_id and secret_id."""
        self._approles[role_id] = Role(secret_id, ttl, max_ttl)

    def add_kubernetes_role(self, role: str, jwt: str, ttl: int, max_ttl: int) -> None:
        """Accept Kubernetes logins for ``role`` that present ``jwt``."""
        self._k8s_roles[role] = Role(jwt, ttl, max_ttl)

    def put(self, path: str, data: dict[str, Any]) -> None:
        """Write a KV v2 secret directly, as a new version."""
        with self._lock:
            self._write(path, data)

    def revoke(self, token: str) -> None:
        """Revoke a token, as ``vault token revoke`` would."""
        with self._lock:
            self._tokens.pop(token, None)

    def revoke_all(self) -> None:
        """Revoke every token the server has issued."""
        with self._lock:
            self._tokens.clear()

    def issued_tokens(self) -> list[str]:
        """Return the value of every token that has not been revoked, expired or not."""
        with self._lock:
            return list(self._tokens)

    def count(self, method: str, path: str) -> int:
        """Return how many requests had this method and path."""
        return self.requests.count((method, path))

    def token_ttl(self, token: str) -> float | None:
        """Return the seconds left on ``token``, or None if it is unknown or expired."""
        with self._lock:
            record = self._valid(token)
            if record is None:
                return None
            return record.expires_at - self.clock() if record.ttl else float("inf")

    # --- state, called with self._lock held ---------------------------------------

    def _issue(
        self, ttl: int, max_ttl: int, renewable: bool, policies: list[str], path: str
    ) -> str:
        now = self.clock()
        value = "hvs." + secrets.token_urlsafe(24)
        self._tokens[value] = Token(
            value=value,
            ttl=ttl,
            max_ttl=max_ttl,
            issued_at=now,
            expires_at=now + ttl if ttl else float("inf"),
            renewable=renewable and ttl > 0,
            policies=policies,
            path=path,
        )
        return value

    def _valid(self, token: str | None) -> Token | None:
        record = self._tokens.get(token or "")
        if record is None or self.clock() >= record.expires_at:
            return None
        return record

    def _write(self, path: str, data: dict[str, Any]) -> dict[str, Any]:
        versions = self._kv.setdefault(path, [])
        metadata = {
            "created_time": _timestamp(),
            "custom_metadata": None,
            "deletion_time": "",
            "destroyed": False,
            "version": len(versions) + 1,
        }
        versions.append({"data": dict(data), "metadata": metadata})
        return metadata

    # --- request handling ---------------------------------------------------------

    def handle(
        self, method: str, path: str, token: str | None, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Return the status and JSON body for one request."""
        self.requests.append((method, path))
        with self._lock:
            login = re.fullmatch(r"/v1/auth/([^/]+)/login", path)
            if method == "POST" and login:
                return self._login(login.group(1), body)
            caller = self._valid(token)
            if caller is None:
                return 403, {"errors": ["permission denied"]}
            if method == "GET" and path == "/v1/auth/token/lookup-self":
                return 200, _envelope(data=self._lookup(caller))
            if method in ("POST", "PUT") and path == "/v1/auth/token/renew-self":
                return self._renew(caller, body)
            kv = re.fullmatch(rf"/v1/{re.escape(self.kv_mount)}/data/(.+)", path)
            if kv and method == "GET":
                versions = self._kv.get(kv.group(1))
                if not versions:
                    return 404, {"errors": []}
                return 200, _envelope(data=versions[-1])
            if kv and method in ("POST", "PUT"):
                if not isinstance(body.get("data"), dict):
                    return 400, {"errors": ["no data provided"]}
                return 200, _envelope(data=self._write(kv.group(1), body["data"]))
            return 404, {"errors": [f"no handler for route {path.removeprefix('/v1/')!r}"]}

    def _login(self, mount: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if mount == self.approle_mount:
            role = self._approles.get(str(body.get("role_id")))
            if role is None or not secrets.compare_digest(
                role.credential, str(body.get("secret_id"))
            ):
                return 400, {"errors": ["invalid role or secret ID"]}
        elif mount == self.kubernetes_mount:
            role = self._k8s_roles.get(str(body.get("role")))
            if role is None or not secrets.compare_digest(role.credential, str(body.get("jwt"))):
                return 403, {"errors": ["permission denied"]}
        else:
            return 400, {"errors": [f"no auth method mounted at auth/{mount}"]}
        value = self._issue(
            role.ttl, role.max_ttl, role.renewable, ["default"], f"auth/{mount}/login"
        )
        return 200, _envelope(auth=self._auth_block(self._tokens[value], role.ttl))

    def _renew(self, caller: Token, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not caller.renewable:
            return 400, {"errors": ["lease is not renewable"]}
        now = self.clock()
        try:
            increment = _seconds(body.get("increment")) or caller.ttl
        except ValueError:
            return 400, {"errors": [f"invalid increment {body.get('increment')!r}"]}
        expires_at = now + increment
        warnings = None
        if caller.max_ttl and expires_at > caller.issued_at + caller.max_ttl:
            expires_at = caller.issued_at + caller.max_ttl
            warnings = [
                f"TTL of {increment}s exceeded the effective max_ttl of "
                f"{int(expires_at - now)}s; TTL value is capped accordingly"
            ]
        caller.expires_at = expires_at
        response = _envelope(auth=self._auth_block(caller, int(expires_at - now)))
        response["warnings"] = warnings
        return 200, response

    def _lookup(self, token: Token) -> dict[str, Any]:
        now = self.clock()
        return {
            "accessor": token.accessor,
            "creation_time": int(token.issued_at),
            "creation_ttl": token.ttl,
            "display_name": token.path.replace("/", "-"),
            "entity_id": "",
            "expire_time": None,
            "explicit_max_ttl": token.max_ttl,
            "id": token.value,
            "issue_time": _timestamp(),
            "meta": None,
            "num_uses": 0,
            "orphan": True,
            "path": token.path,
            "policies": token.policies,
            "renewable": token.renewable,
            "ttl": int(token.expires_at - now) if token.ttl else 0,
            "type": "service",
        }

    @staticmethod
    def _auth_block(token: Token, lease_s: int) -> dict[str, Any]:
        return {
            "client_token": token.value,
            "accessor": token.accessor,
            "policies": token.policies,
            "token_policies": token.policies,
            "metadata": None,
            "lease_duration": lease_s,
            "renewable": token.renewable,
            "entity_id": "",
            "token_type": "service",
            "orphan": True,
        }


class _Handler(BaseHTTPRequestHandler):
    vault: FakeVault

    def do_GET(self) -> None:
        self._respond("GET")

    def do_POST(self) -> None:
        self._respond("POST")

    def do_PUT(self) -> None:
        self._respond("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet; `FakeVault.requests` records each request."""

    def _respond(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            status, payload = 400, {"errors": ["failed to parse JSON input"]}
        else:
            path = self.path.split("?", 1)[0]
            status, payload = self.vault.handle(
                method, path, self.headers.get("X-Vault-Token"), body
            )
        encoded = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)


def _envelope(data: Any = None, auth: Any = None) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": auth,
        "mount_type": "",
    }


def _seconds(value: Any) -> int:
    """Parse a Vault duration: an integer of seconds or a string like ``90``, ``30s``, ``2h``."""
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+)([smh]?)", str(value))
    if match is None:
        raise ValueError(f"invalid duration {value!r}")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
