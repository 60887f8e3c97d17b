"""The base class for stages that keep state between items."""

from __future__ import annotations

from typing import Any, Iterable


class Stage:
    """Subclass this for a stage with set-up, per-item work and tear-down.

    zpipe builds the class as ``Cls(**params)`` inside the stage's own process,
    then calls ``setup()`` once before the first item, ``process(item)`` per
    item (return ``None`` to send nothing) and ``teardown()`` at the end, also
    after a failure. A first stage (a source) defines ``generate()`` instead of
    ``process`` and yields the items to send.

    ParallelPipe's ``stage_run(x)`` is accepted in place of ``process``;
    ``set_get_all()`` makes ``process`` receive a list of every item waiting in
    the input (at least one; the list is the item: one output for it) and
    ``set_get_single()`` returns to one at a time.

    How the stage's table drives ``process`` (README: "Batches, latest frames,
    concurrency"): with ``batch = {...}`` it receives a list of up to
    ``max_items`` items and returns a list of as many outputs (``None`` for an
    item without one), whatever ``set_get_all()`` says; with ``concurrency =
    N`` up to N calls run at once, on threads, or as tasks on an event loop
    when ``process`` is an ``async def`` (which also works without
    ``concurrency``: one call at a time on the loop). ``setup()`` and
    ``teardown()`` always run on the replica's main thread.
    """

    get_all: bool = False

    def setup(self) -> None:
        """Runs once in the stage's process before the first item."""

    def process(self, item: Any) -> Any:
        """Handles one item (or a list of items after ``set_get_all()`` or with
        ``batch``); may be an ``async def``."""
        if type(self).stage_run is not Stage.stage_run:
            return self.stage_run(item)
        raise NotImplementedError(f"{type(self).__name__} must define process(self, item)")

    def stage_run(self, x: Any) -> Any:
        """ParallelPipe's name for ``process``."""
        raise NotImplementedError(f"{type(self).__name__} must define process(self, item)")

    def generate(self) -> Iterable[Any]:
        """A first stage yields its items here."""
        raise NotImplementedError(f"{type(self).__name__} is a first stage and must define "
                                  f"generate(self) yielding items")

    def teardown(self) -> None:
        """Runs once at the end, also after a failure."""

    def set_get_all(self) -> "Stage":
        self.get_all = True
        return self

    def set_get_single(self) -> "Stage":
        self.get_all = False
        return self
