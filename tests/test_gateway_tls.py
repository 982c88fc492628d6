"""The HTTP gateway over HTTPS, with a certificate from a throwaway trustme CA."""

from __future__ import annotations

import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

import arbor
from arbor.config import reset_settings
from arbor.gateway import create_api_key, deploy
from arbor.persistence import open_store


@dataclass
class TlsGateway:
    url: str
    ca_path: str
    key: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_ready(url: str, context: ssl.SSLContext, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway at {url} not ready within {timeout} s")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def gateway(module_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsGateway]:
    folder: Path = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = (
        str(folder / name) for name in ("cert.pem", "key.pem", "ca.pem")
    )
    with open(cert_path, "wb") as chain:
        for blob in issued.cert_chain_pems:
            chain.write(blob.bytes())
    issued.private_key_pem.write_to_path(key_path)
    authority.cert_pem.write_to_path(ca_path)

    os.environ["ARBOR_GATEWAY_AGENT_TYPES"] = "counter=tests.agents:Counter"
    reset_settings()
    arbor.init(database_url=module_pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    url = deploy(port=free_port(), tls_cert=cert_path, tls_key=key_path)
    wait_until_ready(url, ssl.create_default_context(cafile=ca_path))
    store = open_store(module_pg_url)
    created = create_api_key(store, "tls")
    arbor.grant(created.record.principal, "arbor://agent/*/tls/**")
    yield TlsGateway(url, ca_path, created.key)
    from ray import serve

    serve.shutdown()
    store.close()
    arbor.shutdown()
    os.environ.pop("ARBOR_GATEWAY_AGENT_TYPES", None)
    reset_settings()


def test_deploy_returns_https_url(gateway: TlsGateway) -> None:
    assert gateway.url.startswith("https://127.0.0.1:")


def test_client_trusting_ca_spawns_and_asks(gateway: TlsGateway) -> None:
    client = arbor.connect(gateway.url, api_key=gateway.key, verify=gateway.ca_path)
    ref = client.spawn("counter", "tls/c1", start=1)
    assert ref.ask("add", 1) == 2
    assert client.healthz() == {"status": "ok"}


def test_client_with_system_cas_rejects_certificate(gateway: TlsGateway) -> None:
    client = arbor.connect(gateway.url, api_key=gateway.key)
    with pytest.raises(arbor.ClusterUnavailable) as caught:
        client.healthz()
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)


def test_plain_http_to_https_port_fails(gateway: TlsGateway) -> None:
    plain = gateway.url.replace("https://", "http://")
    with pytest.raises(arbor.ClusterUnavailable):
        arbor.connect(plain, api_key=gateway.key).healthz()


def test_deploy_needs_both_tls_files() -> None:
    with pytest.raises(arbor.errors.ConfigError) as caught:
        deploy(port=free_port(), tls_cert="cert.pem")
    assert "--tls-key" in str(caught.value)
