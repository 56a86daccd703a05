"""Known checkpoints, where they live, and how to get them.

Three places a checkpoint can come from, tried in this order by :func:`locate`:

1. an explicit path that exists;
2. the local weights folder (``--weights-dir``/argument > ``$DPT_LAB_WEIGHTS`` > ``./model_weights``),
   scanned by :func:`scan_weights` for ``.pth``/``.pt``/``.safetensors`` files and
   Hugging Face style folders (``config.json`` + ``model.safetensors``/``pytorch_model.bin``);
3. a name from :data:`KNOWN_MODELS`: first the weights folder (under the file's own name),
   then the Hugging Face cache, then a download with :func:`download`.

Nothing here loads a checkpoint; it only finds files. A download that cannot happen
(``HF_HUB_OFFLINE=1``, no route to the Hub) fails within seconds with a
:class:`WeightsError` that says where to put the file by hand.
"""

from __future__ import annotations

import difflib
import os
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import DPTLabError
from .families import KnownModel, published

__all__ = [
    "KnownModel",
    "LocalWeights",
    "KNOWN_MODELS",
    "FAMILIES",
    "WEIGHT_SUFFIXES",
    "WeightsError",
    "UnknownModelError",
    "known_model",
    "hub_status",
    "weights_dir",
    "scan_weights",
    "resolve_in_weights_dir",
    "find_in_cache",
    "download",
    "locate",
    "registry_table_markdown",
]

ProgressFn = Callable[[float, str], object]
PathLike = Union[str, "os.PathLike[str]"]

FAMILIES = tuple(dict.fromkeys(m.family for m in published()))   # the order the picker shows
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
HF_CONFIG = "config.json"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_WEIGHTS_DIR = "model_weights"
ENV_WEIGHTS = "DPT_LAB_WEIGHTS"


class WeightsError(DPTLabError, ValueError):
    """A checkpoint could not be found, fetched, or a local name was refused."""


class UnknownModelError(WeightsError, KeyError):
    """A name that is neither an existing path, a local checkpoint nor a known model."""

    def __init__(self, name: str, suggestions: tuple[str, ...] = ()):
        self.name = name
        self.suggestions = tuple(suggestions)
        msg = f"unknown model {name!r}"
        if self.suggestions:
            msg += "; did you mean: " + ", ".join(self.suggestions) + "?"
        else:
            msg += "; known models: " + ", ".join(sorted(KNOWN_MODELS))
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


# --------------------------------------------------------------------------- registry


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in published()}


def _all_local_names() -> list[str]:
    return [m.local_name for m in KNOWN_MODELS.values()]


def _lookup_known(name: str) -> Optional[KnownModel]:
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    low = name.strip().lower()
    for m in KNOWN_MODELS.values():
        if low == m.name.lower():
            return m
    # A repo id ("depth-anything/Depth-Anything-V2-Small") names the model too, as long
    # as the repo holds a single known checkpoint (the V1 Space holds three).
    hits = [m for m in KNOWN_MODELS.values() if m.repo_id.lower() == low]
    if len(hits) == 1:
        return hits[0]
    return None


def _suggest(name: str, extra: list[str] = ()) -> tuple[str, ...]:
    pool = list(KNOWN_MODELS) + list(extra)
    close = difflib.get_close_matches(name.lower(), [p.lower() for p in pool], n=5, cutoff=0.5)
    lower_to_name = {p.lower(): p for p in pool}
    return tuple(lower_to_name[c] for c in close)


def known_model(name: str) -> KnownModel:
    """The registry entry for `name` (short id, any case, or a repo id)."""
    m = _lookup_known(name)
    if m is None:
        raise UnknownModelError(name, _suggest(name))
    return m


# --------------------------------------------------------------------------- local folder


@dataclass(frozen=True)
class LocalWeights:
    """A checkpoint found in the weights folder (nothing is loaded)."""

    name: str            # path relative to the folder, without the file suffix
    path: Path
    kind: str            # "file" | "hf_folder"
    size_bytes: int
    known: Optional[str] = None   # KNOWN_MODELS name whose file/folder name this matches


def weights_dir(path: Optional[PathLike] = None) -> Path:
    """The local weights folder: `path` > $DPT_LAB_WEIGHTS > ./model_weights (not created)."""
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    env = os.environ.get(ENV_WEIGHTS, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.cwd() / DEFAULT_WEIGHTS_DIR


def _inside(path: Path, root: Path) -> bool:
    """True if `path` resolves to somewhere inside `root` (root resolved already)."""
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _hf_folder_weights(folder: Path) -> Optional[Path]:
    if not (folder / HF_CONFIG).is_file():
        return None
    for fname in HF_WEIGHT_FILES:
        if (folder / fname).is_file():
            return folder / fname
    return None


def _known_for(entry: Path, kind: str) -> Optional[str]:
    name = entry.name
    for m in KNOWN_MODELS.values():
        if kind == "file" and m.filename and Path(m.filename).name == name:
            return m.name
        if kind == "hf_folder" and m.is_folder and m.local_name.lower() == name.lower():
            return m.name
    return None


def scan_weights(folder: Optional[PathLike] = None) -> list[LocalWeights]:
    """Checkpoints directly in `folder` and one level down, sorted by name.

    Finds ``.pth``/``.pt``/``.safetensors`` files and Hugging Face folders (config.json +
    model.safetensors or pytorch_model.bin). Hidden entries, unfinished downloads and
    symlinks that lead outside the folder are skipped. A missing folder gives [].
    """
    root_in = weights_dir(folder)
    try:
        root = root_in.resolve()
    except OSError:
        return []
    if not root.is_dir():
        return []

    found: list[LocalWeights] = []

    def consider(entry: Path, depth: int) -> None:
        if entry.name.startswith("."):
            return
        if entry.is_symlink() and not _inside(entry, root):
            return
        try:
            if entry.is_dir():
                w = _hf_folder_weights(entry)
                if w is not None:
                    if not _inside(w, root) or not _inside(entry / HF_CONFIG, root):
                        return
                    rel = entry.relative_to(root_in).as_posix()
                    found.append(LocalWeights(rel, entry, "hf_folder", w.stat().st_size,
                                              _known_for(entry, "hf_folder")))
                elif depth == 0:
                    for child in sorted(entry.iterdir()):
                        consider(child, depth + 1)
            elif entry.is_file() and entry.suffix.lower() in WEIGHT_SUFFIXES:
                rel = entry.relative_to(root_in).with_suffix("").as_posix()
                found.append(LocalWeights(rel, entry, "file", entry.stat().st_size,
                                          _known_for(entry, "file")))
        except OSError:
            return

    try:
        children = sorted(root_in.iterdir())
    except OSError:
        return []
    for child in children:
        consider(child, 0)
    found.sort(key=lambda lw: lw.name.lower())
    return found


def resolve_in_weights_dir(name: str, folder: Optional[PathLike] = None) -> Path:
    """A user-given local checkpoint name -> its path inside the weights folder.

    Accepts a file or folder name relative to the folder (with or without the file's
    suffix, as :func:`scan_weights` names it). Refuses absolute paths, '..' parts and
    anything (symlinks included) that resolves outside the folder, with WeightsError.
    """
    if not isinstance(name, str) or not name.strip():
        raise WeightsError("empty checkpoint name")
    if "\x00" in name:
        raise WeightsError("checkpoint name contains a NUL byte")
    raw = name.strip()
    parts = raw.replace("\\", "/").split("/")
    if os.path.isabs(raw) or raw.startswith(("/", "\\", "~")) or (len(raw) > 1 and raw[1] == ":"):
        raise WeightsError(f"refusing {name!r}: give a name inside the weights folder, not an absolute path")
    if any(p == ".." for p in parts):
        raise WeightsError(f"refusing {name!r}: '..' is not allowed in a checkpoint name")

    root_in = weights_dir(folder)
    root = root_in.resolve()
    candidate = root_in.joinpath(*[p for p in parts if p not in ("", ".")])
    if candidate.is_symlink() or candidate.exists():
        if not _inside(candidate, root):
            raise WeightsError(f"refusing {name!r}: it leads outside the weights folder {root}")
        if candidate.is_dir():
            w = _hf_folder_weights(candidate)
            if w is None or not _inside(w, root):
                raise WeightsError(f"{name!r} is a folder without {HF_CONFIG} and one of "
                                   f"{', '.join(HF_WEIGHT_FILES)}")
        elif candidate.suffix.lower() not in WEIGHT_SUFFIXES:
            raise WeightsError(f"{name!r} is not a checkpoint file ({', '.join(WEIGHT_SUFFIXES)})")
        return candidate
    for lw in scan_weights(root_in):
        if lw.name == raw or lw.name.lower() == raw.lower():
            return lw.path
    local = [lw.name for lw in scan_weights(root_in)]
    close = difflib.get_close_matches(raw, local, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise WeightsError(f"no checkpoint {name!r} in the weights folder {root}{hint}")


# --------------------------------------------------------------------------- Hub access


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment says now."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def _hf_cache_dir() -> Path:
    """The Hub cache as the environment says now (huggingface_hub reads it at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        v = os.environ.get(var, "").strip()
        if v:
            return Path(v).expanduser()
    home = os.environ.get("HF_HOME", "").strip()
    if home:
        return Path(home).expanduser() / "hub"
    try:
        from huggingface_hub import constants
        return Path(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
        return Path(xdg) / "huggingface" / "hub"


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co").rstrip("/")


def _reachable(url: str, timeout: float) -> tuple[bool, str]:
    """Whether the web server of `url` answers an HTTP(S) HEAD of its root within `timeout`.

    Any HTTP answer counts (even an error status: the real request will report it);
    failed name lookups, refused or reset connections, TLS failures and silence do not.
    A TCP connect alone is not enough: some networks accept every connection and answer
    nothing useful. The probe runs in a daemon thread, so a hanging name lookup cannot
    hold the caller longer than `timeout` either. Proxies from the environment are used.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return False, f"not an http(s) URL: {url!r}"
    root = f"{parsed.scheme}://{parsed.netloc}/"
    result: dict[str, object] = {}

    def probe() -> None:
        req = urllib.request.Request(root, method="HEAD", headers={"User-Agent": "dpt-lab"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                result["status"] = resp.status
        except urllib.error.HTTPError as exc:   # the server answered
            result["status"] = exc.code
        except urllib.error.URLError as exc:
            result["error"] = exc.reason
        except Exception as exc:                # timeouts, resets, TLS errors ...
            result["error"] = exc

    t = threading.Thread(target=probe, name="dpt-lab-probe", daemon=True)
    t.start()
    t.join(timeout)
    if "status" in result:
        return True, ""
    if t.is_alive():
        return False, f"no answer from {parsed.hostname} within {timeout:g} s"
    err = result.get("error")
    if isinstance(err, socket.gaierror):
        return False, f"cannot resolve {parsed.hostname} ({err.strerror or err})"
    return False, f"no answer from {parsed.hostname} ({err})"


def hub_status(timeout: float = 3.0) -> tuple[bool, str]:
    """(True, "") when the Hub (HF_ENDPOINT) answers within `timeout` seconds, else (False,
    why): offline mode, a name that does not resolve, a refused connection, or silence."""
    if _offline():
        return False, "HF_HUB_OFFLINE is set (offline mode)"
    return _reachable(_endpoint(), timeout)


def _manual_hint(model: KnownModel, folder: Path) -> str:
    if model.is_folder:
        files = f"{HF_CONFIG} and {HF_WEIGHT_FILES[0]} (plus any other *.json)"
        return (f"Download {files} from {model.page_url} (files: {model.file_url}) and put them "
                f"in the folder {folder / model.local_name}/")
    return f"Download {model.file_url} and put it at {folder / model.local_name}"


def _fail(model: KnownModel, folder: Path, why: str) -> WeightsError:
    env = os.environ.get(ENV_WEIGHTS)
    where = f" (the weights folder; set ${ENV_WEIGHTS} or --weights-dir to use another)" if not env else \
        f" (the weights folder from ${ENV_WEIGHTS})"
    return WeightsError(
        f"Cannot get model {model.name!r}: {why}. {_manual_hint(model, folder)}{where}."
    )


def _progress_tqdm(progress: ProgressFn, label: str):
    """A tqdm class that also reports to `progress(fraction, text)`."""
    try:
        from huggingface_hub.utils import tqdm as base
    except Exception:  # pragma: no cover
        from tqdm.auto import tqdm as base

    class _Reporting(base):  # type: ignore[misc, valid-type]
        # Counts on its own: a disabled bar (no terminal) keeps neither `n` nor `unit`.
        def update(self, n=1):
            out = super().update(n)
            done = getattr(self, "_dpt_done", 0) + (n or 0)
            self._dpt_done = done
            total = getattr(self, "total", None) or 0
            if total:
                if getattr(self, "unit", "B") == "B" or total > 10_000:
                    text = f"{label}: {done / 1e6:.1f} / {total / 1e6:.1f} MB"
                else:
                    text = f"{label}: {done:g} / {total:g} files"
                progress(max(0.0, min(1.0, done / total)), text)
            return out

    return _Reporting


def find_in_cache(model: KnownModel) -> Optional[Path]:
    """The model's file (or -hf folder) if it is already in the Hub cache; never networks."""
    if not model.on_hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    cache = _hf_cache_dir()

    def cached(fname: str) -> Optional[Path]:
        try:
            hit = try_to_load_from_cache(model.repo_id, fname, cache_dir=str(cache),
                                         repo_type=model.repo_type)
        except Exception:
            return None
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
        return None

    if not model.is_folder:
        return cached(model.filename)  # type: ignore[arg-type]
    config = cached(HF_CONFIG)
    if config is None:
        return None
    for fname in HF_WEIGHT_FILES:
        w = cached(fname)
        if w is not None and w.parent == config.parent:
            return config.parent
    return None


def _download_hub(model: KnownModel, folder: Path, progress: Optional[ProgressFn],
                  timeout: float) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    ok, why = _reachable(_endpoint(), min(timeout, 5.0))
    if not ok:
        raise _fail(model, folder, f"not in the local Hugging Face cache ({_hf_cache_dir()}) and "
                                   f"the Hub {_endpoint()} is unreachable: {why}")
    cache = str(_hf_cache_dir())
    endpoint = _endpoint()
    tq = _progress_tqdm(progress, model.name) if progress else None
    try:
        if model.is_folder:
            snap = Path(snapshot_download(
                model.repo_id, repo_type=model.repo_type, cache_dir=cache,
                allow_patterns=[HF_CONFIG, HF_WEIGHT_FILES[0], "*.json"],
                etag_timeout=timeout, tqdm_class=tq, endpoint=endpoint,
            ))
            if _hf_folder_weights(snap) is None:  # an older repo with only pytorch_model.bin
                hf_hub_download(model.repo_id, HF_WEIGHT_FILES[1], repo_type=model.repo_type,
                                cache_dir=cache, etag_timeout=timeout, tqdm_class=tq,
                                endpoint=endpoint)
            if _hf_folder_weights(snap) is None:
                raise _fail(model, folder, f"the repo {model.repo_id} has no {' or '.join(HF_WEIGHT_FILES)}")
            return snap
        return Path(hf_hub_download(model.repo_id, model.filename, repo_type=model.repo_type,
                                    cache_dir=cache, etag_timeout=timeout, tqdm_class=tq,
                                    endpoint=endpoint))
    except WeightsError:
        raise
    except Exception as exc:  # network, gated repo, missing file, disk ...
        name = type(exc).__name__
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _fail(model, folder, f"download from the Hub failed ({name}: {text})") from exc


def _download_url(model: KnownModel, folder: Path, progress: Optional[ProgressFn],
                  timeout: float) -> Path:
    assert model.url and model.filename
    ok, why = _reachable(model.url, min(timeout, 5.0))
    if not ok:
        raise _fail(model, folder, f"{model.url} is unreachable: {why}")
    target = folder / Path(model.filename).name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise _fail(model, folder, f"cannot write into the weights folder ({exc})") from exc
    try:
        req = urllib.request.Request(model.url, headers={"User-Agent": "dpt-lab"})
        with urllib.request.urlopen(req, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress and total:
                    progress(min(1.0, done / total),
                             f"{model.name}: {done / 1e6:.0f} / {total / 1e6:.0f} MB")
        if total and done != total:
            raise OSError(f"got {done} of {total} bytes")
        shutil.move(tmp, target)
        return target
    except Exception as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _fail(model, folder, f"download of {model.url} failed ({type(exc).__name__}: {exc})") from exc


def download(model: Union[KnownModel, str], *, progress: Optional[ProgressFn] = None,
             timeout: float = 10, weights_dir: Optional[PathLike] = None) -> Path:
    """Path of the model's checkpoint file (or -hf folder), downloading it if needed.

    Hub models go to the Hugging Face cache; a cached copy is returned without any
    network access. With HF_HUB_OFFLINE=1 only the cache is tried. MiDaS' original
    GitHub release files are downloaded into the weights folder. When the source
    cannot be reached this fails within about `timeout` seconds (at most 5 s for the
    connection check) with a WeightsError that says where to put the file by hand.
    `progress(fraction, text)` is called while bytes arrive.
    """
    if isinstance(model, str):
        model = known_model(model)
    folder = _weights_dir_abs(weights_dir)

    if not model.on_hub:
        local = folder / model.local_name
        if local.is_file():
            return local
        if _offline():
            raise _fail(model, folder, "HF_HUB_OFFLINE is set, so nothing is downloaded, "
                                       "and the file is not in the weights folder")
        if progress:
            progress(0.0, f"{model.name}: downloading from {model.url}")
        return _download_url(model, folder, progress, timeout)

    hit = find_in_cache(model)
    if hit is not None:
        if progress:
            progress(1.0, f"{model.name}: found in the Hugging Face cache")
        return hit
    if _offline():
        raise _fail(model, folder, f"HF_HUB_OFFLINE is set (offline mode) and it is not in the "
                                   f"local Hugging Face cache ({_hf_cache_dir()})")
    if progress:
        progress(0.0, f"{model.name}: downloading from {model.page_url}")
    path = _download_hub(model, folder, progress, timeout)
    if progress:
        progress(1.0, f"{model.name}: downloaded")
    return path


def _weights_dir_abs(path: Optional[PathLike]) -> Path:
    d = weights_dir(path)
    try:
        return d.resolve()
    except OSError:
        return d.absolute()


# --------------------------------------------------------------------------- one entry point


def locate(name_or_path: PathLike, *, weights_dir: Optional[PathLike] = None,
           progress: Optional[ProgressFn] = None, timeout: float = 10) -> Path:
    """Find a checkpoint by path, local name or known model name.

    1. an existing path -> that path;
    2. a name :func:`scan_weights` gives for the weights folder -> that checkpoint;
    3. a :data:`KNOWN_MODELS` name (or its repo id) -> its file in the weights folder if
       there, else the Hub cache, else :func:`download`;
    otherwise :class:`UnknownModelError`.

    Meant for trusted input (command line); for names typed into the web UI use
    :func:`resolve_in_weights_dir`, which refuses paths leading out of the folder.
    """
    text = os.fspath(name_or_path)
    if not text.strip():
        raise UnknownModelError(text)
    as_path = Path(text).expanduser()
    if as_path.exists():
        return as_path

    folder = _weights_dir_abs(weights_dir)
    local = scan_weights(folder)
    for lw in local:
        if lw.name == text or lw.path.name == text:
            return lw.path
    for lw in local:
        if lw.name.lower() == text.lower() or lw.path.name.lower() == text.lower():
            return lw.path

    model = _lookup_known(text)
    if model is not None:
        for lw in local:
            if lw.known == model.name:
                return lw.path
        return download(model, progress=progress, timeout=timeout, weights_dir=folder)

    raise UnknownModelError(text, _suggest(text, [lw.name for lw in local]))


# --------------------------------------------------------------------------- docs


def registry_table_markdown() -> str:
    """The registry as a Markdown table for the README."""
    rows = [
        "| name | family | size | source | license | native size |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in KNOWN_MODELS.values():
        if m.repo_type == "url":
            src = f"[{m.repo_id} release `{m.filename}`]({m.file_url})"
        elif m.is_folder:
            src = f"[{m.repo_id}]({m.page_url}) (folder)"
        else:
            prefix = "spaces/" if m.repo_type == "space" else ""
            src = f"[{prefix}{m.repo_id}]({m.page_url}) `{m.filename}`"
        size = m.size + (f", max {m.max_depth:g} m" if m.max_depth else "")
        rows.append(f"| `{m.name}` | {m.family} | {size} | {src} | {m.license} | {m.native_size} |")
    return "\n".join(rows) + "\n"
