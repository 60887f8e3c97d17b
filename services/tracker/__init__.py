"""Tracking team: follows detected objects from frame to frame."""

from .centroid import track

__all__ = ["track"]
