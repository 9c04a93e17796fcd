"""satdet: object detection on georeferenced imagery."""

__version__ = "0.1.0"
