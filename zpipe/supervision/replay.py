"""`zpipe replay FOLDER STAGE FILE`: the dead letters of one stage, through the rest of the pipeline.

The pipeline of FILE runs from STAGE on, its first stage replaced by a source
that yields the items recorded in ``FOLDER/STAGE.msgpack``, in the order they
failed. It runs under the same supervisor as `zpipe launch`, every replica
its own (forked) process, through zpipe.run; the exit status is launch's
(0 finished, 1 failed, 130/143 interrupted; 2 bad input, before anything runs).

Before it starts, the file is moved aside (``STAGE.msgpack.replaying-TIME``),
so that items failing again are dead-lettered anew, into a new file; the
moved file is removed once the replay has finished, and kept (and named) if
it did not.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..config import PipelineSpec, StageSpec, apply_environment, load
from ..errors import ConfigError
from ..replica import deadletters

SOURCE_NAME = "replay"


def _print(text: str) -> None:
    print(f"zpipe: {text}", file=sys.stderr, flush=True)


def replay(folder: str | os.PathLike[str], stage: str, path: str | os.PathLike[str],
           report: Callable[[str], None] = _print) -> int:
    """Run the dead letters of ``stage`` through the pipeline of ``path``; the exit status.

    Raises ConfigError (nothing has run, nothing was moved) for a bad pipeline
    file, an unknown stage, or no (readable) dead letters of that stage in ``folder``.
    """
    from ..api import pipeline as api
    from ..replica import shapes
    from . import launcher

    spec = apply_environment(load(path), os.environ)
    index = spec.index(stage)  # ConfigError for an unknown stage
    if index == 0:
        raise ConfigError(f"{spec.where}: stage {stage!r} is the first stage: a source has no "
                          f"input items, so it has no dead letters to replay")
    file = _letters_file(Path(folder), stage)
    try:
        letters = deadletters.read(file)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    if letters.problem:
        raise ConfigError(f"{file}: {letters.problem}; not replayed (repair or remove it)")
    if not letters.records:
        raise ConfigError(f"{file}: holds no dead letters" +
                          (" (only a record cut short)" if letters.truncated else ""))
    for warning in letters.warnings():
        report(warning)
    launcher.check(spec)  # the file's own checks, as launch makes them
    moved = file.with_name(f"{file.name}{deadletters.REPLAYING}"
                           f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    replaying = replay_spec(spec, index, moved)
    shapes.resolve_spec(replaying)
    os.rename(file, moved)
    count = len(letters.records)
    report(f"{spec.name}: replaying {count} dead letter(s) of stage {stage!r} from {file} "
           f"(moved aside to {moved.name} while it runs)")
    started = time.monotonic()
    with _reports_to(report):
        try:
            outcome = api.run(replaying, mode="process")
        except ConfigError:
            if not file.exists():
                os.rename(moved, file)
            raise
        except KeyboardInterrupt:
            report(f"{spec.name}: replay interrupted; the dead letters are kept in {moved}")
            return 130
        except SystemExit as exc:  # SIGTERM: zpipe.run raises SystemExit(143)
            report(f"{spec.name}: replay interrupted; the dead letters are kept in {moved}")
            return exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - a stage failed: the supervisor said how
            report(f"{spec.name}: replay failed after {time.monotonic() - started:.2f} s; "
                   f"the dead letters are kept in {moved}")
            return 1
    moved.unlink()
    again = outcome.item_errors.get(stage, 0)
    report(f"{spec.name}: replay of {count} dead letter(s) of stage {stage!r}: ok after "
           f"{outcome.elapsed:.2f} s" + (f"; {again} failed again (see above)" if again else ""))
    return 0


def _letters_file(folder: Path, stage: str) -> Path:
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of dead letters")
    file = deadletters.path_for(folder, stage)
    if not file.is_file():
        others = [p.name for p in deadletters.files(folder)]
        raise ConfigError(f"{folder}: no dead letters of stage {stage!r} (no {file.name}"
                          + (f"; there are: {', '.join(others)})" if others else
                             "; there are none here)"))
    return file


def replay_spec(spec: PipelineSpec, index: int, letters: Path) -> PipelineSpec:
    """``spec`` from stage ``index`` on, after a source yielding the items in ``letters``."""
    names = {s.name for s in spec.stages[index:]}
    name, n = SOURCE_NAME, 2
    while name in names:
        name, n = f"{SOURCE_NAME}-{n}", n + 1
    source = StageSpec(name=name, run="zpipe.replica.deadletters:replay_items",
                       params={"path": str(letters)}, target=deadletters.replay_items)
    return replace(spec, stages=(source, *spec.stages[index:]))


class _reports_to:
    """While inside, the supervisor's reports (zpipe.run logs them) go to ``report``."""

    def __init__(self, report: Callable[[str], None]):
        self.handler = _Handler(report)
        self.logger = logging.getLogger("zpipe")

    def __enter__(self) -> None:
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        # Not twice: once here, not again through the root logger.
        self.logger.propagate = False

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


class _Handler(logging.Handler):
    def __init__(self, report: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.report(record.getMessage())
        except Exception:  # noqa: BLE001 - a report must never stop the run
            self.handleError(record)
