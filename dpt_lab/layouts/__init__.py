"""Checkpoint layouts, one module per family. Order matters only for messages."""

from . import depth_anything

ALL_LAYOUTS = [*depth_anything.LAYOUTS]
