"""Storage team: persists the pipeline's results."""

from .jsonl import write

__all__ = ["write"]
