"""The Serve application builder that a RayService's Serve config names.

KubeRay submits the RayService's ``serveConfigV2`` to the new cluster, and Serve imports
``arbor_serve_app:build`` from the image (the Dockerfile puts this file on ``PYTHONPATH``).
The builder starts Arbor's registry and reconciler if the cluster has none, so a new
cluster brings back every agent that the database marks as running. It then returns the
gateway application bound to the ``ARBOR_*`` settings of the pod's environment.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from arbor.client import ensure_registry
from arbor.config import get_settings
from arbor.errors import ConfigError
from arbor.gateway import registration
from arbor.gateway.app import Gateway
from arbor.gateway.deploy import TARGET_ONGOING_REQUESTS

# NOTE: arbor.gateway.deploy.deploy() builds the same application with serve.run. Change
# both option sets together until the arbor package ships a Serve builder of its own.


def build(args: dict[str, Any]) -> Application:
    """Start the registry if needed and return the gateway application.

    Args:
        args: the ``args`` mapping of the Serve config. Arbor reads its settings from the
            ``ARBOR_*`` environment variables of the pod, so the mapping must be empty.

    Returns:
        The bound ``Gateway`` deployment, with the autoscaling bounds of the settings.

    Raises:
        ConfigError: ``args`` is not empty.
    """
    if args:
        raise ConfigError(
            f"the Serve config passes args {sorted(args)} to arbor_serve_app:build, which "
            "takes none; set ARBOR_* environment variables in the RayService pod templates"
        )
    settings = get_settings()
    ensure_registry(settings)
    return Gateway.options(
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
