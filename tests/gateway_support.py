"""Commands and agents of the gateway tests; importable so Ray workers find them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import arbor


class TickerParams(BaseModel):
    """Parameters of `ticker`."""

    model_config = ConfigDict(extra="forbid")

    ticks: int = Field(default=5, ge=1, le=1000)
    interval_s: float = Field(default=0.1, ge=0, le=10)
    fail_at: int | None = None


def ticker(params: dict[str, Any], progress: Callable[[str, Any], None]) -> dict[str, Any]:
    """Report ``ticks`` progress events ``interval_s`` apart; raise at tick ``fail_at``."""
    options = TickerParams.model_validate(params)
    for tick in range(1, options.ticks + 1):
        if options.fail_at == tick:
            raise RuntimeError(f"ticker failed at tick {tick} as asked")
        progress("tick", {"tick": tick})
        time.sleep(options.interval_s)
    return {"ticks": options.ticks}


ticker.params_model = TickerParams  # type: ignore[attr-defined]


class Sleeper(arbor.Agent):
    """Handlers that are slow or reply with values JSON cannot hold."""

    def __init__(self) -> None:
        self.naps = 0

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def raw(self) -> bytes:
        return b"\x00binary"
