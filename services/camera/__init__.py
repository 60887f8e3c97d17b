"""Capture team: the synthetic camera feeding the video-analytics pipeline."""

from .synthetic import frames

__all__ = ["frames"]
