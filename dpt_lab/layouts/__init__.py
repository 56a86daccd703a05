"""Checkpoint layouts, one module per family, each with its LAYOUTS; every module here but
`base` is one (a new family's module is found without being listed). The order matters
only for messages: Depth-Anything first, the most common."""

import importlib
import pkgutil

_MODULES = sorted((m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"),
                  key=lambda name: (name != "depth_anything", name))
ALL_LAYOUTS = [layout for name in _MODULES for layout in importlib.import_module(f".{name}", __name__).LAYOUTS]


def module_for(family: str):
    """The layout module that loads a family (each declares its FAMILIES); it also turns
    the family's declared sizes into configs (`architecture`) for dpt_lab.build."""
    for name in _MODULES:
        module = importlib.import_module(f".{name}", __name__)
        if family in module.FAMILIES:
            return module
    raise KeyError(f"no layout module loads family {family!r}")
