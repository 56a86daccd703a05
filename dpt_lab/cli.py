"""`python -m dpt_lab` / `dpt-lab`: one command line for every DPT Lab tool.

    python -m dpt_lab depth IMAGE --model M --out depth.png [--png16] [--npy] [--cmap turbo]
    python -m dpt_lab attention IMAGE --model M --layer 9 --patch ROW,COL [--column] --out grid.png
    python -m dpt_lab attention IMAGE --model M --distance --out distance.html
    python -m dpt_lab attention IMAGE --model M --rollout --patch ROW,COL [--head-fusion max] --out rollout.png
    python -m dpt_lab features IMAGE --model M --block 9 (--pca | --similar ROW,COL) --out map.png
    python -m dpt_lab norms IMAGE --model M --out norms.html [--csv norms.csv] [--threshold T]
    python -m dpt_lab ablate IMAGE --model M --block 12 [--tokens auto | --patches R,C;R,C] --mode neighbours --out diff.png
    python -m dpt_lab fusion IMAGE --model M --scales 1,0.5,0,1 --out depth.png
    python -m dpt_lab mask IMAGE --model M --range 0.3,1.0 [--invert] [--plane 1.0] --out cutout.png [--mask mask.png]
    python -m dpt_lab scene IMAGE --model M --out scene.glb [--ply scene.ply] [--fov 60 | --focal PX] [--points]
    python -m dpt_lab video IN --model M --out depth.mp4 [--side-by-side] [--max-seconds S] [--stride N] [--npz depth.npz]
    python -m dpt_lab export --model M --out model.onnx [--fixed HxW] [--fp16]

Each subcommand lives in its module (`add_subcommand` / `run_cli`). Errors DPT Lab raises
on purpose (bad image, unknown model, unreadable checkpoint, out-of-range option) and
OS errors (missing file, unwritable folder) end with one line `error: ...` on stderr and
exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from .errors import one_line

#: subcommand modules, in the order --help lists them (each registers its command); export is optional (see _add)
SUBCOMMANDS = ("depth", "attention", "features", "norms", "ablation", "fusion", "mask", "scene", "video", "export")
EXIT_USER_ERROR = 2


def _add(subparsers, name: str) -> Optional[str]:
    """Register module `name`'s subcommand; returns why not when it cannot be imported
    (only tolerated for modules that are optional in this checkout)."""
    try:
        module = importlib.import_module(f"dpt_lab.{name}")
    except ImportError as exc:
        if name != "export":
            raise
        return f"{name}: unavailable ({exc})"
    module.add_subcommand(subparsers)
    return None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="dpt-lab" if os.path.basename(sys.argv[0] or "") == "dpt-lab" else "python -m dpt_lab",
        description="DPT Lab: look inside Dense Prediction Transformer depth models "
                    "(Depth-Anything v1/v2 relative and metric, MiDaS 3.1 BEiT and SwinV2).",
        epilog="Models: a checkpoint file (.pth/.pt/.safetensors), a Hugging Face -hf folder, a name in the "
               "weights folder, or a known model name (downloaded into the Hugging Face cache). "
               "Run `python -m dpt_lab SUBCOMMAND --help` for each tool's options.")
    parser.add_argument("--version", action="version", version=f"dpt_lab {__version__}")
    parser.add_argument("--weights-dir", default=None, metavar="DIR",
                        help="local weights folder (default: $DPT_LAB_WEIGHTS or ./model_weights)")
    sub = parser.add_subparsers(dest="command")
    missing = [m for m in (_add(sub, name) for name in SUBCOMMANDS) if m]
    sub.metavar = "{" + ",".join(sub.choices) + "}"      # the commands' names (ablation.py adds `ablate`)
    if missing:
        parser.epilog += " Not available here: " + "; ".join(missing) + "."
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "command", None) or not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    if args.weights_dir:
        os.environ["DPT_LAB_WEIGHTS"] = str(args.weights_dir)
    from .errors import DPTLabError

    try:
        rc = args.func(args)
    except (DPTLabError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def run_one(name: str, argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dpt_lab.NAME ...`: the same as `python -m dpt_lab NAME ...` (the
    subcommand's name may be given or left out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != name:
        argv = [name, *argv]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
