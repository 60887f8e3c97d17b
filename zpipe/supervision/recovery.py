"""When a replica ends before its work is done: start it again, let its siblings take over, or fail.

The supervisor asks ``Recovery.ended`` about every replica that ends
unexpectedly (an exception, a signal, a non-zero exit, a lost heartbeat):

- a stage with ``restart = "on-failure"`` has it started again under the same
  name once its backoff is over (restarts.py); a replica this process did not
  start (a container) is waited for instead, until it says HELLO again;
- a stage after the first with several replicas and no restart goes on with
  the others (while one is left);
- otherwise the run fails, as before.

Either way its senders are told LOST (delivery.py): what it had not finished
goes to its siblings or to its next life, and when that one is ready they are
told REJOINED. Each life of a replica is a generation, counted here and given
to the replica in WELCOME.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..replica.failures import Failure
from ..wire import protocol
from .restarts import RestartPolicy

if TYPE_CHECKING:
    from .supervisor import ReplicaState, Supervisor


class Recovery:
    """The supervisor's decisions about replicas that end early, and their comebacks."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        spec = supervisor.spec
        self.policies = {stage.replica_name(i): RestartPolicy(stage.max_restarts,
                                                              stage.restart_window)
                         for stage in spec.stages for i in range(stage.replicas)}
        self.due: dict[str, float] = {}       # name -> when to start it again
        self.awaited: dict[str, float] = {}   # name -> by when it must say HELLO again
        self.rejoining: set[str] = set()      # started again, not READY yet
        self.restarts: dict[str, int] = {stage.name: 0 for stage in spec.stages}
        # Per stage, items that ended a replica while worked on after being sent
        # again: [sender, seq, index, why]; its replicas hand them to on_error.
        self.poison: dict[str, list[list[object]]] = {stage.name: [] for stage in spec.stages}

    def replaceable(self, replica: ReplicaState) -> bool:
        """Whether this replica's end need not fail the run."""
        sup = self.supervisor
        if sup.aborting_since is not None or sup.killed or sup.interrupted is not None:
            return False
        stage = sup.spec.stage(replica.stage)
        if stage.restart == "on-failure":
            return True
        index = sup.spec.index(replica.stage)
        return index > 0 and any(r is not replica and not (r.exited or r.gone)
                                 for r in sup.stages[index].replicas)

    def ended(self, replica: ReplicaState, cause: str) -> bool:
        """``replica`` ended early because ``cause``; False if the run must fail."""
        sup = self.supervisor
        if not self.replaceable(replica):
            return False
        stage = sup.spec.stage(replica.stage)
        if replica.attempting is not None:
            self._poison(replica, cause)
        if stage.restart != "on-failure":
            replica.gone = True
            alive = sum(not (r.exited or r.gone) for r in sup._stage_of(replica).replicas)
            sup.report(f"replica {replica.name} {cause}; stage {stage.name!r} goes on with "
                       f"{alive} replica(s) (restart = \"no\")")
            self._tell_senders(replica, protocol.LOST, replica.generation + 1)
            sup._stage_ended_replica(replica)
            return True
        policy = self.policies[replica.name]
        delay = policy.died(time.monotonic())
        if delay is None:
            sup._flapping(replica, policy.recent(), stage.max_restarts, stage.restart_window,
                          cause)
            return True
        self.restarts[stage.name] += 1
        replica.carry()
        self._tell_senders(replica, protocol.LOST, replica.generation + 1)
        if sup.remote:
            self.awaited[replica.name] = time.monotonic() + sup.spec.startup_timeout
            sup.report(f"replica {replica.name} {cause}; waiting up to "
                       f"{sup.spec.startup_timeout:g} s for it to come back (restart = "
                       f"\"on-failure\"; {policy.recent()} death(s) in "
                       f"{stage.restart_window:g} s)")
        else:
            self.due[replica.name] = time.monotonic() + delay
            sup.report(f"restarting replica {replica.name} in {delay:g} s: it {cause} "
                       f"({policy.recent()} death(s) in {stage.restart_window:g} s, at most "
                       f"{stage.max_restarts})")
        return True

    def tick(self, now: float) -> None:
        """Start the replicas whose backoff is over; fail for ones that did not come back."""
        sup = self.supervisor
        for name, when in list(self.due.items()):
            if now >= when:
                del self.due[name]
                replica = sup.replicas[name]
                where = sup.pid_of(replica)  # of the life that ended
                replica.new_life()
                self.rejoining.add(name)
                try:
                    sup.workers.restart(name)
                except OSError as exc:  # no process could be made (fork server gone, EAGAIN)
                    self.rejoining.discard(name)
                    replica.exited = True
                    sup._fail(Failure(replica.stage, name, "died",
                                      message=f"{where}could not be started again: {exc}"))
        for name, deadline in list(self.awaited.items()):
            if now > deadline:
                del self.awaited[name]
                sup._did_not_return(sup.replicas[name], sup.spec.startup_timeout)

    def pending(self) -> bool:
        """Whether a replica is still to be started again or to come back."""
        return bool(self.due or self.awaited or self.rejoining)

    def hello(self, replica: ReplicaState) -> bool:
        """A HELLO: True if it is a replica coming back (its state is reset then)."""
        name = replica.name
        if name in self.awaited:  # a replica started elsewhere, back after a death
            del self.awaited[name]
            replica.new_life()
            self.rejoining.add(name)
            return True
        return name in self.rejoining

    def ready(self, replica: ReplicaState) -> None:
        """A replica that came back is ready: its senders may send to it again, and it
        picks up where its stage is."""
        sup = self.supervisor
        self.rejoining.discard(replica.name)
        self._tell_senders(replica, protocol.REJOINED, replica.generation)
        stage = sup._stage_of(replica)
        sup.report(f"replica {replica.name} is back (life {replica.generation + 1})")
        if not sup.running:
            return  # the start, once every replica is ready, is for it too
        if stage is sup.stages[0]:
            if sup.interrupted is None:
                sup._send(replica, protocol.START)  # a source starts over
            else:
                sup._send(replica, protocol.STOP)
        elif stage.status == "stopping":
            sup._send(replica, protocol.STOP)

    def _poison(self, replica: ReplicaState, cause: str) -> None:
        """The item its replica was working on, sent again after an earlier death, ended
        it again: from now on the stage's on_error takes it instead of its call."""
        sup = self.supervisor
        sender, seq, index = replica.attempting  # type: ignore[misc]
        why = f"it ended replica {replica.name} twice (the last time it {cause})"[:300]
        key = [sender, seq, index, why]
        self.poison[replica.stage].append(key)
        action = {"skip": "skipped", "dead-letter": "dead-lettered"}.get(
            sup.spec.stage(replica.stage).on_error, "skipped")
        sup.report(f"stage {replica.stage!r}: item {index} of message {seq} from "
                   f"{sender.decode(errors='replace')} {why}: it will be {action}")
        for r in sup._stage_of(replica).replicas:
            if r is not replica:
                sup._send(r, protocol.POISON, keys=[key])
        replica.attempting = None

    def downstream_of(self, sender: ReplicaState) -> list[list[object]]:
        """For WELCOME: where each replica of the next stage stands, as a sender that
        starts now must take it (it has heard no LOST or REJOINED of the past):
        ``[generation its messages carry, "up" | "down" | "gone"]``."""
        sup = self.supervisor
        index = sup.spec.index(sender.stage)
        if index + 1 >= len(sup.stages) or not sup.spec.leased(index + 1):
            return []
        states: list[list[object]] = []
        for r in sup.stages[index + 1].replicas:
            if r.gone:
                states.append([r.generation, "gone"])
            elif r.name in self.due or r.name in self.awaited:
                states.append([r.generation + 1, "down"])  # dead; its next life is coming
            elif r.name in self.rejoining:
                states.append([r.generation, "down"])      # started again, not ready yet
            else:
                states.append([r.generation, "up"])
        return states

    def _tell_senders(self, replica: ReplicaState, kind: str, generation: int) -> None:
        """LOST or REJOINED, to the replicas of the stage before (on a leased link)."""
        sup = self.supervisor
        index = sup.spec.index(replica.stage)
        if index == 0 or not sup.spec.leased(index):
            return
        for sender in sup.stages[index - 1].replicas:
            sup._send(sender, kind, replica=replica.replica, generation=generation)
