"""What a run that did not finish lost in flight, stage by stage.

A run that ends normally has lost nothing: the ordered drain compares counts
until every item has arrived. One that is interrupted past its grace period,
or aborted by a failure, may end with items still in the links and in the
replicas' hands. From each replica's last counts (its final report, else its
last heartbeat) this says, for each stage after the source:

- ``never_received``: entries the stage before sent that it never took off
  its socket (they were in ZeroMQ's queues or the OS's buffers);
- ``unfinished``: entries it took in but had not finished (waiting in its
  input buffer, in the user's hands, or held back for reordering);
- ``unsent``: outputs it produced that never left it (a batch not yet sent).

For a stream function, "finished" means taken from its iterator: what it
holds inside (a window, a reorder buffer of its own) cannot be seen.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class StageCounts(Protocol):
    name: str

    @property
    def items_in(self) -> int: ...

    @property
    def items_out(self) -> int: ...

    @property
    def pending(self) -> int: ...

    @property
    def unsent(self) -> int: ...


def losses(stages: Sequence[StageCounts]) -> dict[str, dict[str, int]]:
    """Per stage, what it lost (only stages that lost something)."""
    lost: dict[str, dict[str, int]] = {}
    for index, stage in enumerate(stages):
        # Heartbeat counts can be a second old: never report a negative loss.
        never = max(0, stages[index - 1].items_out - stage.items_in) if index else 0
        figures = {"never_received": never, "unfinished": stage.pending,
                   "unsent": stage.unsent}
        if any(figures.values()):
            lost[stage.name] = figures
    return lost


def describe(lost: dict[str, dict[str, int]]) -> list[str]:
    """One line per stage that lost something, then the total."""
    lines = []
    for name, figures in lost.items():
        parts = []
        in_flight = figures["never_received"] + figures["unfinished"]
        if in_flight:
            parts.append(f"{in_flight} items lost in flight ({figures['never_received']} sent "
                         f"to it and never received, {figures['unfinished']} received and "
                         f"never finished)")
        if figures["unsent"]:
            parts.append(f"{figures['unsent']} of its outputs never sent")
        lines.append(f"stage {name!r}: " + "; ".join(parts))
    total = sum(f["never_received"] + f["unfinished"] + f["unsent"] for f in lost.values())
    if lines:
        lines.append(f"lost in flight in all: {total} entries; nothing else was lost")
    return lines
