"""zpipe: multi-stage pipelines over ZeroMQ, every stage replica its own process.

The public API is what this module exports; every other module is private.
"""

from .api import Pipeline, Task, run
from .config import PipelineSpec, StageSpec, load
from .errors import ConfigError, EncodeError, StageError, ZpipeError
from .stage import Stage
from .supervisor import Outcome

__all__ = ["ConfigError", "EncodeError", "Outcome", "Pipeline", "PipelineSpec", "Stage",
           "StageError", "StageSpec", "Task", "ZpipeError", "load", "run"]
__version__ = "0.1.0"
