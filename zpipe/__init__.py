"""zpipe: multi-stage pipelines over ZeroMQ, every stage replica its own process.

The public API is what this module exports; every other module is private.
"""

from .config import PipelineSpec, StageSpec, load
from .errors import ConfigError, EncodeError, StageError, ZpipeError
from .stage import Stage

__all__ = ["ConfigError", "EncodeError", "PipelineSpec", "Stage", "StageError", "StageSpec",
           "ZpipeError", "load"]
__version__ = "0.1.0"
