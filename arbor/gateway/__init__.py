"""The HTTP front door: a Ray Serve application with a FastAPI ingress.

`deploy` starts it; `register_type` and `register_command` fill its allow-lists before that.
"""

from __future__ import annotations

from arbor.gateway.deploy import APP_NAME, deploy, undeploy
from arbor.gateway.keys import create_api_key
from arbor.gateway.registration import register_command, register_type

__all__ = [
    "APP_NAME",
    "create_api_key",
    "deploy",
    "register_command",
    "register_type",
    "undeploy",
]
