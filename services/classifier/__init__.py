"""ML team: labels tracked objects."""

from .shape_model import classify

__all__ = ["classify"]
