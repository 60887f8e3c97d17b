"""Vision team: finds bright objects in camera frames."""

from .blobs import BlobDetector

__all__ = ["BlobDetector"]
