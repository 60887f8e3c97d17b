"""The soak's short version (bench/ has the long one: `python -m bench --only soak`).

50,000 items with a unique id each through source -> relay1 (replicas 3) ->
relay2 -> sink, both relays with restart on, a relay replica SIGKILLed three
times while the source sends: every id arrives at least once, no more
duplicates than zpipe says it sent again, and each kill is one restart.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import scenarios, suite  # noqa: E402


def test_a_short_soak_under_kills_delivers_every_id_at_least_once():
    n = suite.SIZES["quick"]
    result = scenarios.soak(n["soak"], suite.SOAK_REPLICAS, suite.SOAK_KILL_EVERY,
                            n["soak_kills"], n["soak_seconds"], n["soak_timeout"])
    said = "\n".join(result["output"][-40:])
    assert result["status"] == 0 and not result["timed_out"], said
    assert len(result["kills"]) == n["soak_kills"], said
    assert result["missing"] == 0 and not result["unexpected"], said
    assert result["distinct"] == n["soak"]
    assert result["duplicates"] <= result["redelivered"], said
    assert result["restarts"] == len(result["kills"]), said
