"""Spawns that claim a lent warm actor directly, without a call through the registry.

A warm spawn through the registry makes four Ray calls: from the caller to the registry,
from the registry to a warm actor, and both replies. So the registry lends the caller one
ready warm actor of a type at a time. The caller's next spawn of that type claims the lent
actor itself, with one call, and then reports the spawn to the registry.

The reply that lends an actor also names a spare: another ready actor, which stays in
the pool. A spawn whose loan is spent, and whose next loan has not arrived, claims the
spare. The warm actor takes the first claim that reaches it, so a spawn that loses the
spare to another goes through the registry. With a spare in hand, a spawn requests its
next loan 20 ms after its claim returns. Without one, it sends the request right after
the claim, so that a spawn right after it finds a loan. A request during the claim slows
the claim by about a millisecond on a busy machine.

The registry must check or count some spawns itself, so these go through it: spawns
with capabilities, from inside an agent, with Ray placement options, ``max_pending`` or
``passivate_idle_s``, and into a namespace with a cap on agents.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from arbor.config import get_settings
from arbor.names import namespace_of
from arbor.persistence import STARTING, AgentRecord
from arbor.registry.info import AgentInfo
from arbor.registry.spec import (
    RAY_ACTOR_KEYS,
    WARM_LEND_USE_S,
    SpawnSpec,
    spawn_audit,
    start_error,
)
from arbor.runtime import telemetry

logger = logging.getLogger(__name__)


@dataclass
class _Loan:
    """A warm actor lent to this process, as the registry's ``_lend_warm`` describes it.

    A spare is kept as a loan with ``lent`` false.
    """

    actor: str
    handle: Any
    # The registry's default durability, for a spawn that names none.
    durability: str
    # Namespaces with a cap on agents, which only the registry can apply.
    capped: frozenset[str]
    registry: Any
    # When the request whose reply lent the actor was sent, on the monotonic clock.
    requested_at: float
    lent: bool = True


# Seconds after a loan request until which a spawn waits for the reply.
_REPLY_WAIT_S = 0.05
# Seconds after a claim that spent a loan, with a spare in hand, before the request for
# the next loan.
_ASK_LATER_S = 0.02

_lock = threading.Lock()
# Lent warm actors by agent type path.
_loans: dict[str, _Loan] = {}
# By agent type path, the future of a `lend` reply, as (registry handle, future, time sent).
_replies: dict[str, tuple[Any, Any, float]] = {}
# Spares by agent type path.
_spares: dict[str, list[_Loan]] = {}
# Warm actors whose claim by this process ran or failed lately, which a later reply may
# still lend or name.
_claimed: collections.deque[str] = collections.deque(maxlen=64)
# Makes the first call to each lent actor, off the spawn path.
_warmer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="arbor-loan")


def keep(
    type_path: str,
    registry: Any,
    lent: dict[str, Any] | None,
    requested_at: float,
    first_call: bool = True,
) -> None:
    """Keep the warm actor that a reply of ``registry`` lent, for the next spawn of its type.

    ``first_call`` makes the first call to the actor now, in the background; a `lend`
    reply has made it already.
    """
    if lent is None:
        return
    described = [(lent["actor"], lent["handle"], True)]
    described += [(spare["actor"], spare["handle"], False) for spare in lent.get("spares", ())]
    durability, capped = lent["durability"], frozenset(lent["capped"])
    with _lock:
        fresh = [
            _Loan(actor, handle, durability, capped, registry, requested_at, is_lent)
            for actor, handle, is_lent in described
            if actor not in _claimed
        ]
        loan = fresh[0] if fresh and fresh[0].lent else None
        _spares[type_path] = [spare for spare in fresh if not spare.lent]
    if loan is not None:
        _give_back(type_path, loan)
    if first_call:
        for actor in fresh:
            _in_background(_first_call, actor.handle)


def _in_background(work: Callable[..., None], *args: Any) -> None:
    """Run ``work`` on the loan thread, unless the interpreter is exiting."""
    with contextlib.suppress(RuntimeError):
        # The executor rejects work once interpreter shutdown has begun, as when a
        # `lend` reply arrives while the process exits.
        _warmer.submit(work, *args)


def _first_call(handle: Any) -> None:
    """Call a lent actor once, so that the claim finds its address known.

    Ray looks up an actor's address at the first call through a new handle, and that
    lookup took 2 to 3 ms of a claim here.
    """
    try:
        ray.get(handle.info.remote(), timeout=get_settings().spawn_timeout_s)
    except RayError as error:
        # The claim meets the same error and spawns through the registry.
        logger.debug("lent warm actor did not reply: %s", error)


def _lent_reply(reply: concurrent.futures.Future[Any]) -> None:
    """Make the first call to the actors that a `lend` reply names, once the reply arrives."""
    if reply.cancelled() or reply.exception() is not None:
        return
    lent = reply.result()
    if lent is not None:
        for described in (lent, *lent.get("spares", ())):
            _in_background(_first_call, described["handle"])


def request(type_path: str, registry: Any) -> None:
    """Ask ``registry`` for a loan of a ``type_path`` actor, without waiting for the reply.

    The registry replies once an actor is ready, as after a refill, and the next spawn
    of the type uses the loan if the reply is there by then. Nothing is asked while a
    loan or a request for one is held, because each request takes an actor.
    """
    with _lock:
        if type_path in _loans or type_path in _replies:
            return
        # A future of the reply, which Ray completes as the reply arrives, so that taking
        # a loan from it later costs no call into Ray.
        reply = registry.lend.remote(type_path).future()
        reply.add_done_callback(_lent_reply)
        _replies[type_path] = (registry, reply, time.monotonic())


def wants_loan(spec: SpawnSpec) -> bool:
    """Return whether a spawn like ``spec`` could use a loan that this process lacks."""
    with _lock:
        has_loan = spec.type_path in _loans or spec.type_path in _replies
    return not has_loan and _direct(spec)


def reset() -> None:
    """Forget every loan, when this process leaves its Ray session."""
    with _lock:
        _loans.clear()
        _replies.clear()
        _spares.clear()
        _claimed.clear()


def spawn(spec: SpawnSpec) -> tuple[AgentInfo, Any] | None:
    """Start the agent of ``spec`` in a warm actor lent to this process.

    Returns:
        The agent's info and its actor's handle, or None when the spawn must go through
        the registry. That is the case when nothing is lent, when the spawn needs the
        registry's checks, when the name is taken (by another agent or by an earlier
        attempt of this spawn), and when the lent actor is gone.

    Raises:
        HandlerError: the agent's ``__init__`` or ``on_start`` raised. The registry has
            then killed the actor and freed the name.
    """
    if not _direct(spec):
        return None
    type_path = spec.type_path
    loan = _take(type_path, wait=not _has_spare(type_path)) or _take_spare(type_path)
    if loan is None:
        return None
    if namespace_of(spec.name) in loan.capped:
        _give_back(type_path, loan)
        return None
    record = AgentRecord(
        name=spec.name,
        type_path=spec.type_path,
        status=STARTING,
        spawn_id=spec.spawn_id,
        options={**spec.options, "actor": loan.actor},
    )
    durability = spec.options.get("durability", loan.durability)
    settings = get_settings()
    with telemetry.span("arbor.spawn", {"arbor.agent": spec.name, "arbor.type": spec.type_path}):
        claim = loan.handle.claim.remote(
            spec.name, spec.init_args, spec.init_kwargs, durability, record, spawn_audit(spec)
        )
        # Without a spare, the next loan is on its way while this claim runs, for a spawn
        # right after this one. Asking after sending the claim keeps the request off the
        # claim's path.
        ask_later = _has_spare(type_path)
        if not ask_later:
            request(type_path, loan.registry)
        try:
            report = ray.get(claim, timeout=settings.spawn_timeout_s)
            if not report.get("taken"):
                _forget(loan.actor)
        except RayTaskError as error:
            _forget(loan.actor)
            _failed(spec, loan)
            raise start_error(spec.name, error, f"warm actor {loan.actor}", settings) from None
        except (RayActorError, GetTimeoutError) as error:
            _forget(loan.actor)
            # The actor is gone (a new registry removes unclaimed warm actors) or does not
            # reply in time. The registry path then starts the agent or reports why not.
            logger.warning(
                "spawn of agent %s in lent warm actor %s failed (%s: %s); spawning through "
                "the registry",
                spec.name,
                loan.actor,
                type(error).__name__,
                error,
            )
            _failed(spec, loan)
            return None
    if report.get("taken"):
        # Nothing was written and the actor is still ready for another spawn.
        _give_back(type_path, loan)
        return None
    if report.get("runs") is not None:
        # Another spawn claimed the actor first, and it keeps that agent.
        return None
    info = AgentInfo.from_record(report["record"])
    loan.registry.claimed_directly.remote(spec, loan.actor, info)
    if ask_later:
        _in_background(_request_later, type_path, loan.registry)
    return info, loan.handle


def _forget(actor: str) -> None:
    """Never use ``actor`` again: this process's claim made it an agent or failed in it.

    A reply sent before the registry heard of the claim may still lend or name it.
    """
    with _lock:
        _claimed.append(actor)


def _request_later(type_path: str, registry: Any) -> None:
    """Request the next loan after _ASK_LATER_S, unless a spawn has requested it meanwhile.

    A spawn right after this one claims the spare and sends the request during its
    claim, so this request does not run beside that claim. The report of the claim that
    spent the loan went out before, so the registry counts that claim before it lends
    again.
    """
    time.sleep(_ASK_LATER_S)
    request(type_path, registry)


def _direct(spec: SpawnSpec) -> bool:
    """Return whether ``spec`` may skip the registry, by the rules in the module's description."""
    options = spec.options
    return (
        spec.spawner is None
        and not spec.capabilities
        and options.get("placement", "dedicated") == "dedicated"
        and "max_pending" not in options
        and "passivate_idle_s" not in options
        and not any(key in RAY_ACTOR_KEYS for key in options)
    )


def _usable_spares(type_path: str) -> list[_Loan]:
    """Drop the spares for ``type_path`` named too long ago, and return the rest.

    The caller must hold ``_lock``.
    """
    now = time.monotonic()
    spares = _spares.setdefault(type_path, [])
    spares[:] = [spare for spare in spares if now - spare.requested_at <= WARM_LEND_USE_S]
    return spares


def _has_spare(type_path: str) -> bool:
    """Return whether this process has a usable spare for ``type_path``."""
    with _lock:
        return bool(_usable_spares(type_path))


def _take_spare(type_path: str) -> _Loan | None:
    """Remove and return a usable spare for ``type_path``, or None."""
    with _lock:
        spares = _usable_spares(type_path)
        return spares.pop(0) if spares else None


def _take(type_path: str, wait: bool = True) -> _Loan | None:
    """Remove and return the loan for ``type_path``, or None when there is none to use.

    ``wait`` waits a moment for a reply on its way; without it, only a reply that has
    arrived counts.
    """
    with _lock:
        loan = _loans.pop(type_path, None)
        pending = _replies.pop(type_path, None) if loan is None else None
    if pending is not None:
        registry, reply, requested_at = pending
        # A reply on its way arrives within a few milliseconds of its request, less than
        # a spawn through the registry takes. One that takes longer waits for a refill,
        # so a spawn waits only until _REPLY_WAIT_S after the request.
        timeout = max(0.0, requested_at + _REPLY_WAIT_S - time.monotonic()) if wait else 0
        try:
            lent = reply.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            with _lock:
                _replies.setdefault(type_path, pending)
            return None
        except RayError as error:
            # The registry restarted or failed. Its reply to the next spawn lends again.
            logger.warning(
                "the registry's reply to a loan request for %s failed: %s", type_path, error
            )
            return None
        keep(type_path, registry, lent, requested_at, first_call=False)
        with _lock:
            loan = _loans.pop(type_path, None)
    if loan is None:
        return None
    if time.monotonic() - loan.requested_at > WARM_LEND_USE_S:
        # The registry may give an actor lent that long ago to another spawn, so this
        # one goes back unused.
        loan.registry.return_loan.remote(loan.actor)
        return None
    return loan


def _give_back(type_path: str, loan: _Loan) -> None:
    """Keep ``loan`` for the next spawn, or return it to the registry when one is held."""
    if not loan.lent:
        with _lock:
            _spares.setdefault(type_path, []).insert(0, loan)
        return
    with _lock:
        held = _loans.setdefault(type_path, loan)
    if held is not loan:
        # One loan per type is enough, and the pool's other actors serve other callers.
        loan.registry.return_loan.remote(loan.actor)


def _failed(spec: SpawnSpec, loan: _Loan) -> None:
    """Have the registry kill the lent actor and delete what the failed claim stored."""
    try:
        ray.get(
            loan.registry.claimed_directly.remote(spec, loan.actor, None),
            timeout=get_settings().spawn_timeout_s,
        )
    except RayError as error:
        # The registry is gone as well. A new one removes unclaimed warm actors, and its
        # reconciler finds any record the claim stored.
        logger.warning(
            "the registry did not clean up after spawn of agent %s in warm actor %s: %s",
            spec.name,
            loan.actor,
            error,
        )
        ray.kill(loan.handle, no_restart=True)
