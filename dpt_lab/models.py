"""The models shared by every session: ModelManager, a bounded LRU of loaded models,
thread-safe, each name loaded once even when several sessions ask for it at the same
time, and the random model the app starts with when no checkpoint is found.

The startup model is, in this order: the --model argument; a checkpoint in the weights
folder; a known model already in the Hugging Face cache; else, when the Hub answers within
HUB_PROBE_S seconds, DOWNLOAD_MODEL (Depth-Anything-V2-Small, ~100 MB), downloaded in the
background once the page is up (`preload`; requests for it wait, the banner shows the
download's progress); else, or when that download fails, the Depth-Anything-V2-Small
architecture with RANDOM weights, flagged untrained, whose banner (`manager.banner(name)`)
says so on every tab. `startup_reason` says which, and why.

Device: "auto" (the default) is cuda, then mps, then cpu. dtype float16 / bfloat16 (for
GPUs) keeps the weights in float32 and runs the model under torch.autocast, which does the
matrix products and convolutions in half precision and keeps the ops that overflow or lose
too much there (layer norms, softmax, sums) in float32 (see precision.py).

Names typed into the UI are only accepted when they are in the picker (registry names,
local checkpoints, the startup model, the random model); a local name is resolved with
weights.resolve_in_weights_dir, which refuses paths out of the weights folder.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import SessionError

RANDOM_MODEL = "depth-anything-v2-small (random weights, untrained)"
PREFERRED = ("depth-anything-v2-small", "depth-anything-v2-base", "depth-anything-v2-large")
DOWNLOAD_MODEL = "depth-anything-v2-small"    # what a first run downloads when nothing is found
HUB_PROBE_S = 3.0                              # how long the first run waits for the Hub to answer

ProgressFn = Callable[[float, str], Any]


# -- the random model ----------------------------------------------------------------------
def weight_bytes(model) -> int:
    """Bytes of a model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_random_model(seed: int = 0, device=None):
    """Depth-Anything-V2-Small (ViT-S/14, 12 blocks, DPT decoder 64 features) with random
    weights: every tensor is seeded noise scaled by its fan-in (the same recipe for every
    run, so pictures are reproducible), layer scales 0.2, and a positive output bias so the
    final ReLU does not flatten the map. It shows what the tools do, nothing about depth.
    The recipe is dpt_lab.build's, for every family; this is its ViT-S v2 under the app's name."""
    from .architectures import build

    model = build("depth_anything_v2", "vits", seed)
    model.info.source = "random weights (untrained)"
    model.info.name = RANDOM_MODEL
    model.info.notes = ["untrained: random weights, the outputs mean nothing"]
    if device is not None:
        model = model.to(device)
    return model


def untrained_banner(folder: Path) -> str:
    """The plain words shown on every tab while the random model is in use."""
    return (
        "⚠️ **Untrained model: random weights.** DPT Lab found no checkpoint, so it runs the "
        "Depth-Anything-V2-Small architecture with random weights. The depth maps, attention "
        "maps and norms shown here mean nothing: they only show what the tools do. "
        "To get real weights: download `depth_anything_v2_vits.pth` from "
        "https://huggingface.co/depth-anything/Depth-Anything-V2-Small and put it in the weights "
        f"folder `{folder}` (or set `DPT_LAB_WEIGHTS` / `--weights-dir`), then restart; or run "
        "`python app.py --model depth-anything-v2-small` where huggingface.co can be reached; or "
        "pick a model in the list above (it is downloaded when the Hub can be reached)."
    )


# -- models ------------------------------------------------------------------------------
class ModelManager:
    """Loaded models shared by every session (bounded LRU, thread-safe, one load per name)."""

    def __init__(self, model: Optional[str] = None, *, weights_dir=None, device=None,
                 max_models: Optional[int] = None, dtype=None, download: Optional[bool] = None):
        from . import weights
        from .choices import check_device, check_dtype

        self.folder = _absolute(weights.weights_dir(weights_dir))
        self.device_spec = check_device(device)     # resolved when the first model loads (torch is imported then)
        self._device = None
        self.dtype = check_dtype(dtype)            # "float16" / "bfloat16", or None for float32
        self.download = (os.environ.get("DPT_LAB_DOWNLOAD", "1").strip().lower() not in ("0", "no", "off", "false")
                         if download is None else bool(download))
        self.downloading: Optional[str] = None     # the startup model being fetched in the background
        self.download_fraction = 0.0
        self.download_failed: Optional[str] = None  # ... and given up on (its requests get the random model)
        self.max_models = max(1, int(max_models or os.environ.get("DPT_LAB_MAX_MODELS") or 2))
        self._models: "OrderedDict[str, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._trusted: dict[str, Path] = {}       # names given on the command line -> their path
        self._errors: dict[str, BaseException] = {}
        self.loads = 0                            # checkpoint loads so far (tests)
        self.startup, self.startup_reason = self._pick(model)

    @property
    def device(self):
        """The torch device models load on ("auto": cuda, then mps, then cpu)."""
        if self._device is None:
            from . import precision

            self._device = precision.pick_device(self.device_spec)
        return self._device

    # -- which model ---------------------------------------------------------------------
    def _pick(self, model: Optional[str]) -> tuple[str, str]:
        from . import weights

        if model is not None and str(model).strip():
            text = str(model).strip()
            path = weights.locate(text, weights_dir=self.folder)   # WeightsError / UnknownModelError
            known = weights.KNOWN_MODELS.get(text)
            name = known.name if known else text
            self._trusted[name] = Path(path)
            return name, f"--model {text} ({path})"
        local = weights.scan_weights(self.folder)
        if local:
            ranked = sorted(local, key=lambda lw: (_rank(lw.known), lw.name.lower()))
            best = ranked[0]
            return best.known or best.name, f"checkpoint in the weights folder: {best.path}"
        for name in sorted(weights.KNOWN_MODELS, key=_rank):
            km = weights.KNOWN_MODELS[name]
            try:
                hit = weights.find_in_cache(km)
            except Exception:   # noqa: BLE001 - a broken cache is the same as no cache here
                hit = None
            if hit is not None:
                return name, f"known model in the Hugging Face cache: {hit}"
        nothing = f"no checkpoint in {self.folder} and none in the Hugging Face cache"
        if not self.download:
            return RANDOM_MODEL, f"{nothing}; downloads are off (DPT_LAB_DOWNLOAD=0)"
        ok, why = weights.hub_status(HUB_PROBE_S)
        if not ok:
            return RANDOM_MODEL, f"{nothing}, and the Hub cannot be reached to download {DOWNLOAD_MODEL}: {why}"
        self.downloading = DOWNLOAD_MODEL
        return DOWNLOAD_MODEL, f"{nothing}: downloading {DOWNLOAD_MODEL} (about 100 MB) from the Hugging Face Hub"

    def is_untrained(self, name: Optional[str]) -> bool:
        return name == RANDOM_MODEL

    @property
    def untrained(self) -> bool:
        """True when the startup model is the random one."""
        return self.is_untrained(self.startup)

    def banner(self, name: Optional[str] = None) -> str:
        """Banner text for model `name` (default: the startup model): the download's progress
        while the startup model is fetched, the untrained warning for the random model, else ''."""
        name = name or self.startup
        if name == self.download_failed:
            name = RANDOM_MODEL
        if self.downloading and name == self.downloading:
            return (f"⏳ **Downloading weights for {name}: {self.download_fraction:.0%}.** The page works "
                    "as soon as they are in; what you ask for meanwhile waits for them.")
        if self.is_untrained(name):
            why = f" (the download of {self.download_failed} failed)" if self.download_failed else ""
            return untrained_banner(self.folder).replace("DPT Lab found no checkpoint",
                                                         f"DPT Lab found no checkpoint{why}")
        return ""

    def choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the model picker: the startup model, local checkpoints,
        every known model (tagged local / cached / download), and the random model."""
        from . import weights

        local = weights.scan_weights(self.folder)
        local_known = {lw.known for lw in local if lw.known}
        out: list[tuple[str, str]] = []
        seen: set[str] = set()

        def add(label: str, value: str):
            if value not in seen:
                seen.add(value)
                out.append((label, value))

        if self.startup in self._trusted:
            add(f"{self.startup} (command line)", self.startup)
        for lw in local:
            if not lw.known:
                add(f"{lw.name} (weights folder)", lw.name)
        for name, km in weights.KNOWN_MODELS.items():
            if name in local_known:
                tag = "weights folder"
            elif km.on_hub and _cached(km):
                tag = "cached"
            else:
                tag = "download"
            add(f"{name} · {km.display_name or name} ({tag})", name)
        add(RANDOM_MODEL, RANDOM_MODEL)
        return out

    def validate(self, name) -> str:
        """The name if the picker offers it (or it is the startup / command-line model),
        else SessionError. Nothing outside the weights folder is reachable from here."""
        from . import weights

        if not isinstance(name, str) or not name.strip():
            raise SessionError("no model chosen: pick one in the model list")
        name = name.strip()
        if name == RANDOM_MODEL or name in self._trusted or name in weights.KNOWN_MODELS:
            return name
        if any(lw.name == name for lw in weights.scan_weights(self.folder)):
            return name
        close = [v for _, v in self.choices() if name.lower() in v.lower()][:3]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SessionError(f"unknown model {name!r}: pick one from the model list{hint}")

    # -- loading -------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def weight_bytes(self) -> int:
        """Bytes of the parameters of the models loaded now (the store's outside_allowance)."""
        with self._lock:
            models = list(self._models.values())
        return sum(weight_bytes(m) for m in models)

    def get(self, name, progress: Optional[ProgressFn] = None):
        """The loaded model `name`, loading (and downloading) it once if needed. While the
        startup download runs, a request for it waits for it; once that download has failed,
        the random model answers in its place (the page said so)."""
        name = self.validate(name)
        if name == self.download_failed:
            name = RANDOM_MODEL
        with self._lock:
            model = self._models.get(name)
            if model is not None:
                self._models.move_to_end(name)
                return model
            lock = self._name_locks.setdefault(name, threading.Lock())
        with lock:
            with self._lock:
                model = self._models.get(name)
                if model is not None:
                    self._models.move_to_end(name)
                    return model
            try:
                model = self._load(name, progress)
            except BaseException as exc:
                self._errors[name] = exc
                raise
            self._errors.pop(name, None)
            with self._lock:
                self._models[name] = model
                self._models.move_to_end(name)
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
        return model

    def _load(self, name: str, progress: Optional[ProgressFn]):
        from . import weights
        from .checkpoints import load_model

        self.loads += 1
        if name == RANDOM_MODEL:
            if progress:
                progress(0.0, "building the random (untrained) model")
            return self._precision(build_random_model(device=self.device))
        family = max_depth = None
        if name in self._trusted:
            path = self._trusted[name]
        elif name in weights.KNOWN_MODELS:
            km = weights.KNOWN_MODELS[name]
            family, max_depth = km.family, km.max_depth
            local = [lw for lw in weights.scan_weights(self.folder) if lw.known == name]
            path = local[0].path if local else weights.download(km, progress=progress, weights_dir=self.folder)
        else:
            path = weights.resolve_in_weights_dir(name, self.folder)
        if progress:
            progress(0.99, f"loading {name}")
        model = load_model(path, family=family, max_depth=max_depth, device=self.device)
        model.info.name = name
        return self._precision(model)

    def _precision(self, model):
        from . import precision

        return precision.apply(model, self.dtype)

    def preload(self, name: Optional[str] = None) -> threading.Thread:
        """Load `name` (default: the startup model) in a background thread; an error is
        kept and raised again by the next get(). The startup download reports its progress
        (download_fraction, the banner); when it fails the random model takes over."""
        target = name or self.startup

        def note(fraction, _text):
            self.download_fraction = max(self.download_fraction, min(1.0, float(fraction)))

        def run():
            fetching = target == self.downloading
            try:
                self.get(target, note if fetching else None)
            except BaseException as exc:   # noqa: BLE001 - reported by get() later
                if fetching:
                    self.download_failed, self.startup = target, RANDOM_MODEL
                    self.startup_reason = f"the download of {target} failed ({exc}); random weights"
                    print(f"dpt-lab: the download of {target} failed, starting with random weights: {exc}",
                          flush=True)
                else:
                    print(f"dpt-lab: could not load {target}: {exc}", flush=True)
            else:
                if fetching:
                    print(f"dpt-lab: downloaded {target}; it answers from now on", flush=True)
            finally:
                if fetching:
                    self.downloading = None

        t = threading.Thread(target=run, name="dpt-lab-preload", daemon=True)
        t.start()
        return t

    def describe(self, name: str) -> str:
        """One line about a loaded model (loads it if needed)."""
        info = self.get(name).info
        grid = "stages" if info.window_sizes else f"patch {info.patch_size}"
        return (f"**{name}** · {info.family} {info.size} · {info.num_blocks} blocks, {grid} · base size "
                f"{info.base_size} · {info.depth_kind}")


def _rank(known: Optional[str]) -> tuple[int, int]:
    if known in PREFERRED:
        return (0, PREFERRED.index(known))
    return (1, 0) if known else (2, 0)


def _cached(km) -> bool:
    from . import weights

    try:
        return weights.find_in_cache(km) is not None
    except Exception:  # noqa: BLE001
        return False


def _absolute(p: Path) -> Path:
    try:
        return Path(p).resolve()
    except OSError:
        return Path(p).absolute()
