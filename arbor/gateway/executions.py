"""Asynchronous command runs: the detached actor that runs one, and the events it stores.

Each execution runs in its own detached Ray actor, so it outlives the gateway replica that
started it. Its progress events, final status and result go to the store, where every
replica reads them for ``GET /v1/executions/{id}`` and the event stream.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any

import ray

from arbor.config import NAMESPACE, Settings
from arbor.persistence import open_store
from arbor.persistence.gateway import FAILED, PENDING, RUNNING, SUCCEEDED, ExecutionRecord

logger = logging.getLogger(__name__)

# Ray actor names of running executions start with this.
RUNNER_PREFIX = "arbor-exec-"


class ExecutionRunner:
    """Runs one command and records its events; the actor exits when the command ends."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = Settings(**settings)

    def run(self, execution_id: str, function_path: str, params: dict[str, Any]) -> str:
        """Run the command to its end; returns the final status."""
        from arbor.gateway.registration import load_function

        store = open_store(self._settings.database_url, self._settings, migrate=False)
        try:
            store.finish_execution(execution_id, RUNNING)

            def progress(kind: str, data: Any) -> None:
                store.append_execution_event(execution_id, kind, data)

            try:
                function = load_function(function_path)
                result = function(params, progress)
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                logger.warning("execution %s failed: %s", execution_id, reason)
                store.append_execution_event(
                    execution_id,
                    FAILED,
                    {"error": reason, "traceback": traceback.format_exc(limit=20)},
                )
                store.finish_execution(execution_id, FAILED, error=reason)
                return FAILED
            try:
                store.append_execution_event(execution_id, SUCCEEDED, {"result": result})
            except (TypeError, ValueError) as error:
                reason = f"the command's result is not JSON: {error}"
                store.append_execution_event(execution_id, FAILED, {"error": reason})
                store.finish_execution(execution_id, FAILED, error=reason)
                return FAILED
            store.finish_execution(execution_id, SUCCEEDED, result=result)
            logger.info("execution %s succeeded", execution_id)
            return SUCCEEDED
        finally:
            store.close()
            ray.actor.exit_actor()


def start_execution(
    store: Any,
    settings: Settings,
    command: str,
    function_path: str,
    params: dict[str, Any],
    principal: str,
) -> ExecutionRecord:
    """Record a new execution and start its actor; returns at once with the pending record."""
    now = datetime.now(UTC)
    record = ExecutionRecord(
        id=uuid.uuid4().hex,
        command=command,
        principal=principal,
        params=params,
        status=PENDING,
        result=None,
        error=None,
        created_at=now,
        updated_at=now,
    )
    store.create_execution(record)
    # NOTE: if the actor's process dies, the execution stays "running" in the store.
    # Nothing restarts it, because a command may not be safe to run twice.
    runner = (
        ray.remote(ExecutionRunner)
        .options(
            name=f"{RUNNER_PREFIX}{record.id}",
            namespace=NAMESPACE,
            lifetime="detached",
            max_restarts=0,
            num_cpus=0,
        )
        .remote(settings.model_dump())
    )
    runner.run.remote(record.id, function_path, params)
    logger.info("execution %s of command %s started by %s", record.id, command, principal)
    return record
