"""Typed errors of the public API. Each message is one line a user can act on."""


class DPTLabError(Exception):
    """Base class of every error DPT Lab raises on purpose."""


class CheckpointError(DPTLabError, ValueError):
    """A file or folder that is not a checkpoint DPT Lab can load, and why."""


class SessionError(DPTLabError, ValueError):
    """A request the app cannot answer as asked (no image yet, unknown model, a click
    outside the image, an out-of-range control), and why, in one line."""


class ExportError(DPTLabError, RuntimeError):
    """The model could not be exported (bad options, or the exporter failed), and why."""


class ExportBusyError(ExportError):
    """Another export is running in this process. (Here, not in export.py, so the app can
    catch it by type without importing torch and onnx.)"""


def one_line(exc: BaseException) -> str:
    """An error's whole message as one line (whitespace runs folded; an OSError's file name
    added when the message lacks it), or its type's name when it has none: what the app's
    messages and the CLI's `error:` line show."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split())


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of another library's error (at most `limit` characters),
    to quote inside one of DPT Lab's messages; its type's name when it has none."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def finite_number(value, what: str, error: type = DPTLabError) -> float:
    """`value` as a finite float, or `error` saying "<what> must be a number" (booleans, None
    and blank text are not numbers)."""
    import math

    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise error(f"{what} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise error(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise error(f"{what} must be finite, got {value!r}")
    return v
