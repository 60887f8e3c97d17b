"""zpipe: multi-stage pipelines over ZeroMQ, every stage replica its own process.

The public API is what this module exports; every other module is private.
"""

from typing import TYPE_CHECKING, Any

from .api.stage import Stage
from .config import PipelineSpec, StageSpec, load
from .errors import ConfigError, EncodeError, StageError, ZpipeError

if TYPE_CHECKING:
    from .api.pipeline import Pipeline, Task, run
    from .supervision.supervisor import Outcome

__all__ = ["ConfigError", "EncodeError", "Outcome", "Pipeline", "PipelineSpec", "Stage",
           "StageError", "StageSpec", "Task", "ZpipeError", "load", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The Python API (and multiprocessing with it) and the supervisor load on
    # first use: stage processes started by `zpipe launch` never need them and
    # start faster.
    if name in ("Pipeline", "Task", "run"):
        from .api import pipeline as api
        return getattr(api, name)
    if name == "Outcome":
        from .supervision.supervisor import Outcome
        return Outcome
    raise AttributeError(f"module 'zpipe' has no attribute {name!r}")
