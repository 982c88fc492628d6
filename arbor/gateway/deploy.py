"""Deploying the gateway as a Ray Serve application."""

from __future__ import annotations

import logging
from typing import Any

from arbor.config import Settings, get_settings
from arbor.errors import ConfigError
from arbor.gateway import registration

logger = logging.getLogger(__name__)

APP_NAME = "arbor-gateway"

# Ongoing requests per replica that Serve's autoscaler aims for before it adds a replica.
TARGET_ONGOING_REQUESTS = 16


def deploy(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    settings: Settings | None = None,
) -> str:
    """Start Serve's HTTP proxy and deploy the gateway on it; returns the base URL.

    Call it from a process connected with `arbor.init`. The agent types and commands
    registered in this process, and those in the settings, are passed to every replica.
    Serve keeps one HTTP proxy per cluster: when Serve already runs, its host, port and TLS
    files stay as they are, these arguments are ignored (Serve logs a warning), and the
    returned URL is the running proxy's.

    Args:
        host: address the proxy listens on; 127.0.0.1 keeps it off the network.
        port: TCP port of the proxy.
        tls_cert: PEM certificate chain file; with ``tls_key`` the proxy serves HTTPS only.
        tls_key: PEM private key file of ``tls_cert``.
        settings: default `arbor.config.get_settings()`.

    Raises:
        ConfigError: only one of ``tls_cert`` and ``tls_key`` is given.

    Example:
        >>> arbor.gateway.register_type("counter", Counter)
        >>> arbor.gateway.deploy(port=8000)
        'http://127.0.0.1:8000'
    """
    from ray import serve

    from arbor.gateway.app import Gateway

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key; pass both or neither")
    settings = settings or get_settings()
    http_options: dict[str, Any] = {"host": host, "port": port}
    if tls_cert is not None:
        http_options.update(ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    serve.start(http_options=http_options)
    application = Gateway.options(
        autoscaling_config={
            "min_replicas": settings.gateway_min_replicas,
            "max_replicas": max(settings.gateway_max_replicas, settings.gateway_min_replicas),
            "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
        },
        max_ongoing_requests=settings.gateway_max_ongoing_requests,
        logging_config={"enable_access_log": settings.gateway_access_log},
        # Replicas wait on the registry and agents; they take no CPU slot from agents.
        ray_actor_options={"num_cpus": 0},
    ).bind(
        settings.model_dump(),
        registration.agent_types(settings),
        registration.commands(settings),
    )
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
    url = _proxy_url()
    logger.info("gateway deployed at %s", url)
    return url


def _proxy_url() -> str:
    """Return the URL Serve's proxy listens on, which may predate this deploy's arguments."""
    # A private Serve API (pinned Ray 2.60): the public API does not expose the options
    # of a proxy that was already running.
    from ray.serve.context import _get_global_client

    options = _get_global_client().http_config
    scheme = "https" if options.ssl_certfile else "http"
    return f"{scheme}://{options.host}:{options.port}"


def undeploy() -> None:
    """Delete the gateway application; Serve's proxy keeps running."""
    from ray import serve

    serve.delete(APP_NAME)
