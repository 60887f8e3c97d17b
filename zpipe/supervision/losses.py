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
- ``unsent``: outputs it produced that never left it (a batch not yet sent);
- ``unacknowledged``, instead of the first two on a leased link (delivery.py)
  where a replica was lost on the way (the counts of its lost lives end
  with them): items its senders held, sent and not acknowledged.

A stage that finished lost nothing, whatever the counts of replicas lost on
the way say (what they held was sent again).

For a stream function, "finished" means taken from its iterator: what it
holds inside (a window, a reorder buffer of its own) cannot be seen.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class StageCounts(Protocol):
    name: str
    status: str

    @property
    def items_in(self) -> int: ...

    @property
    def items_out(self) -> int: ...

    @property
    def pending(self) -> int: ...

    @property
    def unsent(self) -> int: ...

    @property
    def unacked(self) -> int: ...

    @property
    def relived(self) -> bool:
        """Whether a replica of it was lost (restarted, or gone for good)."""


def losses(stages: Sequence[StageCounts], leased: Sequence[bool] | None = None
           ) -> dict[str, dict[str, int]]:
    """Per stage, what it lost (only stages that lost something).

    ``leased[i]``: the link into stage i acknowledges each message
    (delivery.py); what it lost is then what its senders still held
    unacknowledged, exactly, however its replicas' own counts went.
    """
    lost: dict[str, dict[str, int]] = {}
    for index, stage in enumerate(stages):
        if stage.status == "done":
            continue  # it finished: everything sent to it arrived and was finished
        if index and leased is not None and leased[index] and (
                stage.relived or stages[index - 1].relived):
            # A replica lost on the way: its counts end with it, and what it held
            # was sent again. What its senders never saw acknowledged is exact;
            # it may include items further on (acknowledgements come from the end).
            figures = {"never_received": 0, "unfinished": 0,
                       "unacknowledged": stages[index - 1].unacked, "unsent": stage.unsent}
        else:
            # Heartbeat counts can be a second old: never report a negative loss.
            never = max(0, stages[index - 1].items_out - stage.items_in) if index else 0
            figures = {"never_received": never, "unfinished": stage.pending,
                       "unacknowledged": 0, "unsent": stage.unsent}
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
        if figures["unacknowledged"]:
            parts.append(f"{figures['unacknowledged']} items lost in flight (sent to it and "
                         f"never acknowledged)")
        if figures["unsent"]:
            parts.append(f"{figures['unsent']} of its outputs never sent")
        lines.append(f"stage {name!r}: " + "; ".join(parts))
    total = sum(sum(f.values()) for f in lost.values())
    if lines:
        lines.append(f"lost in flight in all: {total} entries; nothing else was lost")
    return lines
