"""The registry's account of warm actors: loans, spares and claims, without Ray."""

from __future__ import annotations

import pytest

from arbor.config import Settings
from arbor.registry import warm
from arbor.registry.warm import WarmActor, WarmPool

TYPE = "tests.agents:Counter"
NODE = "node-1"


@pytest.fixture
def pool() -> WarmPool:
    account = WarmPool(Settings(warm_pool_size=2, warm_pool_max=2))
    for name in ("a", "b", "c"):
        account.add(TYPE, WarmActor(name, handle=None, node_id=NODE))
    return account


def names(actors: list[WarmActor]) -> list[str]:
    return [actor.name for actor in actors]


def test_spares_are_newest_and_ready(pool: WarmPool) -> None:
    lent = pool.lend(TYPE)
    assert lent is not None and lent.name == "a"
    assert names(pool.name_spares(TYPE, 1)) == ["c"]
    assert pool.ready(TYPE) == 2
    assert pool.count(TYPE) == 3


def test_take_leaves_spares_for_last(pool: WarmPool) -> None:
    pool.name_spares(TYPE, 2)  # b and c
    taken = [pool.take(TYPE), pool.take(TYPE), pool.take(TYPE), pool.take(TYPE)]
    assert [actor.name if actor else None for actor in taken] == ["a", "b", "c", None]


def test_claimed_spare_leaves_the_ready_actors(pool: WarmPool) -> None:
    pool.lend(TYPE)
    (spare,) = pool.name_spares(TYPE, 1)
    assert pool.claimed(spare.name) is spare
    assert pool.claimed(spare.name) is None
    assert spare.name not in {entry["name"] for entry in pool.actors()}
    assert pool.ready(TYPE) == 1


def test_claimed_loan_ends(pool: WarmPool) -> None:
    lent = pool.lend(TYPE)
    assert lent is not None
    assert pool.claimed(lent.name) is lent
    assert pool.count(TYPE) == 2
    assert lent.name not in {entry["name"] for entry in pool.actors()}


def test_surplus_keeps_named_spares_until_they_expire(
    pool: WarmPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(warm.time, "monotonic", lambda: now[0])
    pool.name_spares(TYPE, 1)  # c
    # The target is 2 on one node: one of the three goes, and not the spare.
    assert names(pool.surplus(TYPE, [NODE])) == ["b"]
    assert names(pool.surplus(TYPE, [NODE])) == []

    now[0] += warm.WARM_LEND_S + 1
    pool.add(TYPE, WarmActor("d", handle=None, node_id=NODE))
    # The spare is no client's any more, and the newest go first.
    assert names(pool.surplus(TYPE, [NODE])) == ["d"]
    pool.add(TYPE, WarmActor("e", handle=None, node_id=NODE))
    pool.name_spares(TYPE, 1)  # e
    assert names(pool.surplus(TYPE, [NODE])) == ["c"]


def test_spare_on_a_node_that_left_is_removed(pool: WarmPool) -> None:
    pool.name_spares(TYPE, 3)
    assert sorted(names(pool.surplus(TYPE, ["node-2"]))) == ["a", "b", "c"]
