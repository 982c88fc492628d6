"""PostgreSQL over TLS: the store honours sslmode and sslrootcert in ARBOR_DATABASE_URL.

The module starts a private PostgreSQL server with ``ssl=on`` and a certificate from a
trustme CA, listening on 127.0.0.1 only. Its pg_hba.conf accepts TLS connections
(``hostssl``) and rejects plain ones (``hostnossl``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
import trustme

from arbor.config import Settings, redact_url
from arbor.errors import StoreUnavailable
from arbor.persistence import STARTING, AgentRecord, open_store


@dataclass
class TlsServer:
    port: int
    ca_file: str
    other_ca_file: str

    def url(self, query: str, host: str = "127.0.0.1", database: str = "arbor_tls") -> str:
        return f"postgresql://postgres@{host}:{self.port}/{database}?{query}"


def find_server_bin() -> str | None:
    """Return the newest PostgreSQL server bin folder, or None if none is installed."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(path.split("/")[-3]) if path.split("/")[-3].isdigit() else 0,
    )
    if candidates:
        return os.path.dirname(candidates[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(command: list[str], run_as: list[str]) -> None:
    result = subprocess.run([*run_as, *command], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
        )


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    bin_dir = find_server_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")

    # initdb refuses to run as root, so a root test run starts the server as postgres.
    run_as: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        run_as = ["runuser", "-u", "postgres", "--"]

    base = tempfile.mkdtemp(prefix="arbor-pg-tls-")
    data = os.path.join(base, "data")
    ca = trustme.CA()
    other_ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = os.path.join(base, "ca.crt")
    other_ca_file = os.path.join(base, "other-ca.crt")
    cert_file = os.path.join(base, "server.crt")
    key_file = os.path.join(base, "server.key")
    ca.cert_pem.write_to_path(ca_file)
    other_ca.cert_pem.write_to_path(other_ca_file)
    server_cert.cert_chain_pems[0].write_to_path(cert_file)
    server_cert.private_key_pem.write_to_path(key_file)
    # PostgreSQL refuses a key file that its owner's group or others can read.
    os.chmod(key_file, 0o600)
    if owner is not None:
        for path in (base, cert_file, key_file):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    os.chmod(base, 0o755)

    port = free_port()
    pg_ctl = os.path.join(bin_dir, "pg_ctl")
    started = False
    try:
        run(
            [os.path.join(bin_dir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust"],
            run_as,
        )
        with open(os.path.join(data, "postgresql.conf"), "a", encoding="utf-8") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\n"
                f"unix_socket_directories = '{base}'\n"
                f"ssl = on\nssl_cert_file = '{cert_file}'\nssl_key_file = '{key_file}'\n"
                "fsync = off\n"
            )
        with open(os.path.join(data, "pg_hba.conf"), "w", encoding="utf-8") as hba:
            hba.write(
                "local all all trust\n"
                "hostssl all all 127.0.0.1/32 trust\n"
                "hostnossl all all 127.0.0.1/32 reject\n"
            )
        log_file = os.path.join(base, "server.log")
        try:
            run([pg_ctl, "-D", data, "-l", log_file, "-w", "-t", "60", "start"], run_as)
        except RuntimeError as error:
            with open(log_file, encoding="utf-8") as log:
                pytest.fail(f"{error}\nserver log:\n{log.read()}")
        started = True

        server = TlsServer(port, ca_file, other_ca_file)
        with psycopg.connect(
            server.url(f"sslmode=verify-full&sslrootcert={ca_file}", database="postgres"),
            autocommit=True,
        ) as connection:
            connection.execute("CREATE DATABASE arbor_tls")
        yield server
    finally:
        if started:
            run([pg_ctl, "-D", data, "-m", "fast", "-w", "stop"], run_as)
        shutil.rmtree(base, ignore_errors=True)


def quick_settings(url: str) -> Settings:
    """Settings with a short retry budget: a TLS rejection does not heal by retrying."""
    return Settings(database_url=url, db_retry_attempts=2, db_retry_backoff_s=0.05)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_verify_full_with_right_ca_works(tls_server: TlsServer, host: str) -> None:
    url = tls_server.url(f"sslmode=verify-full&sslrootcert={tls_server.ca_file}", host=host)
    name = f"tls-{uuid.uuid4().hex[:8]}"

    store = open_store(settings=quick_settings(url))
    try:
        store.create_agent(
            AgentRecord(name=name, type_path="tests.agents:Counter", status=STARTING, spawn_id="s1")
        )
        record = store.get_agent(name)
    finally:
        store.close()

    assert record is not None
    assert record.name == name
    assert record.spawn_id == "s1"


def test_store_connection_is_encrypted(tls_server: TlsServer) -> None:
    url = tls_server.url(f"sslmode=verify-full&sslrootcert={tls_server.ca_file}")

    with psycopg.connect(url) as connection:
        row = connection.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()

    assert row is not None
    assert row[0] is True
    assert row[1].startswith("TLSv1.")


def test_verify_full_with_other_ca_fails(tls_server: TlsServer) -> None:
    url = tls_server.url(f"sslmode=verify-full&sslrootcert={tls_server.other_ca_file}")

    with pytest.raises(StoreUnavailable) as caught:
        open_store(settings=quick_settings(url))

    message = str(caught.value)
    assert "certificate verify failed" in message
    assert "sslmode=verify-full" in message
    assert "ARBOR_DATABASE_URL" in message


def test_plain_connection_is_rejected(tls_server: TlsServer) -> None:
    url = tls_server.url("sslmode=disable")

    with pytest.raises(StoreUnavailable) as caught:
        open_store(settings=quick_settings(url))

    message = str(caught.value)
    assert "pg_hba.conf rejects connection" in message
    assert "no encryption" in message


def test_verify_full_with_missing_root_cert_fails(tls_server: TlsServer, tmp_path: object) -> None:
    missing = f"{tmp_path}/no-such-ca.crt"
    url = tls_server.url(f"sslmode=verify-full&sslrootcert={missing}")

    with pytest.raises(StoreUnavailable) as caught:
        open_store(settings=quick_settings(url))

    assert missing in str(caught.value)


def test_redact_url_keeps_tls_options() -> None:
    url = "postgresql://arbor:s3cret-pw@db:5432/arbor?sslmode=verify-full&sslrootcert=/etc/ca.crt"

    redacted = redact_url(url)

    assert redacted == (
        "postgresql://arbor:***@db:5432/arbor?sslmode=verify-full&sslrootcert=/etc/ca.crt"
    )
