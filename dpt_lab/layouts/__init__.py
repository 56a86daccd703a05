"""Checkpoint layouts, one module per family. Order matters only for messages."""

from . import beit, depth_anything, swin2

ALL_LAYOUTS = [*depth_anything.LAYOUTS, *beit.LAYOUTS, *swin2.LAYOUTS]
