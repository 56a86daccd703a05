"""Block norms: the length of every token after every transformer block, and the
high-norm outliers of "Vision Transformers Need Registers" (arXiv 2309.16588).

    result = norms.block_norms(model, x)       # ONE model.encode(x, Record(norms=True))
    result = norms.norms_from_features(feats)  # or reuse an encode that recorded norms
    result.patch_norms   list, one (gh, gw) float32 array per block (SwinV2: its stage's grid)
    result.cls_norms     list of floats, one per block, or None (no CLS: SwinV2)
    result.grids         (gh, gw) per block
    out = norms.find_outliers(result)          # threshold="auto" | a number (e.g. 150)
    norms.heatmap_figure(result, outliers=out) / stats_figure(result, out) / histogram_figure(result, 24, out)
    norms.draw_outliers(image, meta, result, out)   # outlier patches outlined on the image
    norms.figures_html(fig, ...)               # one standalone (offline) HTML page
    result.to_csv(path)                        # block,row,col,norm

A norm is the L2 norm over channels of the residual stream right after block b (before
any final LayerNorm), computed in float32 by the encoder itself (encoders.base.token_norms):
for the -hf layouts it is the norm of transformers' hidden_states[b + 1].

Block numbers are 1-based everywhere in this module's API, tables, titles and files
(block 1 is the first transformer block), as the app shows them; rows and columns of the
patch grid are 0-based, row 0 at the top.

Outliers are patch tokens only (the CLS token is plotted, never flagged: it is not a place
on the image). With threshold="auto" each block gets its own threshold

    t_b = max(median_b + k * 1.4826 * MAD_b,  min_ratio * median_b)

over that block's patch norms; a token is an outlier when its norm is > t_b. MAD * 1.4826
is the robust standard deviation (the same as sigma for a normal field) and, unlike the
standard deviation, a handful of tokens at 100x the median cannot inflate it, so they
cannot hide themselves. k = 6 (DEFAULT_K): six robust sigmas is a false alarm once in
~1e9 tokens of a normal field, i.e. none across the ~33k tokens of ViT-L at 518, while
the high-norm tokens of the paper sit tens of sigmas out (norms in the hundreds against
a bulk of ~1-50). Real norm fields are skewed rather than normal, so the second term
asks for at least min_ratio x the median (DEFAULT_MIN_RATIO = 2): a block whose norms
are all nearly equal (MAD ~ 0: early blocks, or a flat field) flags nothing over float
noise, and a perfectly flat field (MAD = 0, every norm == median) flags nothing at all.
A fixed threshold (threshold=150) is the same number for every block.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .attention import patch_box
from .encoders.base import EncoderFeatures, Record
from .errors import DPTLabError
from .imaging import meta_sizes

__all__ = [
    "NormsError", "BlockError", "ThresholdError",
    "BlockNorms", "Outliers", "block_norms", "norms_from_features", "find_outliers", "parse_threshold",
    "heatmap_figure", "stats_figure", "histogram_figure", "figures_html", "draw_outliers", "patch_box",
    "summary", "add_subcommand", "run_cli", "main",
    "DEFAULT_K", "DEFAULT_MIN_RATIO", "MAD_TO_SIGMA",
]

DEFAULT_K = 6.0             # robust sigmas above the median (see the module docstring)
DEFAULT_MIN_RATIO = 2.0     # ... and at least this many times the median
MAD_TO_SIGMA = 1.4826       # MAD of a normal distribution * 1.4826 = its sigma
SIG_DIGITS = 4              # significant digits of the numbers sent to the browser
COLORSCALE = "Viridis"
OUTLIER_COLOR = "#ff2d55"


# -- errors ---------------------------------------------------------------------------
class NormsError(DPTLabError, ValueError):
    """Block norms could not be computed or shown, and why (one line)."""


class BlockError(NormsError):
    """A block number outside 1..num_blocks."""


class ThresholdError(NormsError):
    """An outlier threshold that is neither 'auto' nor a positive number, or a bad k / ratio."""


# -- the norms ------------------------------------------------------------------------
@dataclass
class BlockNorms:
    """Per-block token norms of one image (batch item `batch` of the encode)."""

    patch_norms: list[np.ndarray]               # one (gh, gw) float32 array per block
    cls_norms: Optional[list[float]]            # one float per block, or None without CLS
    grids: list[tuple[int, int]]                # (gh, gw) per block
    has_cls: bool
    input_size: tuple[int, int] = (0, 0)        # (h, w) of the model input
    batch: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.patch_norms)

    @property
    def num_tokens(self) -> int:
        """Patch tokens over all blocks (CLS not counted)."""
        return int(sum(a.size for a in self.patch_norms))

    def check_block(self, block: int) -> int:
        """A 1-based block number, validated; returns the 0-based index."""
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
            raise BlockError(f"block must be an integer 1..{self.num_blocks}, got {block!r}")
        if not 1 <= int(block) <= self.num_blocks:
            raise BlockError(f"block {int(block)} is out of range: this model has blocks 1..{self.num_blocks}")
        return int(block) - 1

    def block(self, block: int) -> np.ndarray:
        """The (gh, gw) norms of a 1-based block."""
        return self.patch_norms[self.check_block(block)]

    def patch_size(self, block: int) -> tuple[float, float]:
        """Input pixels per token of a 1-based block (14 / 16 for ViTs; 4, 8, 16, 32 by SwinV2 stage)."""
        gh, gw = self.grids[self.check_block(block)]
        h, w = self.input_size
        return (h / gh if h else float("nan"), w / gw if w else float("nan"))

    def stats(self) -> dict[str, np.ndarray]:
        """Per block, over the patch tokens: block (1-based), min, median, mean, p99, max,
        and cls (the CLS norm; None without CLS). NaN norms are ignored."""
        rows = {"block": np.arange(1, self.num_blocks + 1)}
        for name in ("min", "median", "mean", "p99", "max"):
            rows[name] = np.empty(self.num_blocks, dtype=np.float64)
        for b, a in enumerate(self.patch_norms):
            v = a[np.isfinite(a)].astype(np.float64) if not np.isfinite(a).all() else a.astype(np.float64).ravel()
            if v.size == 0:
                for name in ("min", "median", "mean", "p99", "max"):
                    rows[name][b] = np.nan
                continue
            rows["min"][b], rows["max"][b] = v.min(), v.max()
            rows["median"][b], rows["p99"][b] = np.percentile(v, [50, 99])
            rows["mean"][b] = v.mean()
        rows["cls"] = None if self.cls_norms is None else np.asarray(self.cls_norms, dtype=np.float64)
        return rows

    def to_csv(self, path: Union[str, Path, None] = None, *, include_cls: bool = True) -> str:
        """Every norm as CSV with the header `block,row,col,norm` (block 1-based, row/col
        0-based on that block's grid), blocks in order, tokens row-major. With a CLS token
        and include_cls, each block starts with the CLS row, written as row -1, col -1.
        Returns the text; also writes it to `path` when given."""
        parts = []
        for b, a in enumerate(self.patch_norms):
            gh, gw = a.shape
            rr, cc = np.divmod(np.arange(gh * gw), gw)
            cols = [np.full(gh * gw, b + 1), rr, cc]
            vals = a.ravel().astype(np.float64)
            if include_cls and self.cls_norms is not None:
                cols = [np.concatenate([[b + 1], cols[0]]), np.concatenate([[-1], rr]), np.concatenate([[-1], cc])]
                vals = np.concatenate([[self.cls_norms[b]], vals])
            parts.append((np.stack(cols, 1), vals))
        buf = io.StringIO()
        buf.write("block,row,col,norm\n")
        for ints, vals in parts:
            buf.write("".join(f"{i},{r},{c},{v:.7g}\n" for (i, r, c), v in zip(ints.tolist(), vals.tolist())))
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text


def norms_from_features(feats: EncoderFeatures, *, batch: int = 0) -> BlockNorms:
    """The norms an encode already recorded (Record(norms=True)): no second encode."""
    blocks = feats.blocks
    if not blocks or any(rec.token_norms is None for rec in blocks):
        raise NormsError("this encode recorded no token norms: encode with Record(norms=True)")
    size = int(blocks[0].token_norms.shape[0])
    if not -size <= batch < size:
        raise NormsError(f"batch index {batch} is outside the batch of {size}")
    patch, cls, grids = [], [], []
    has_cls = bool(blocks[0].has_cls)
    for b, rec in enumerate(blocks):
        gh, gw = (int(rec.grid[0]), int(rec.grid[1]))
        row = rec.token_norms[batch].detach().float().cpu().numpy()
        start = 1 if rec.has_cls else 0
        if row.shape[0] != gh * gw + start:
            raise NormsError(f"block {b + 1} recorded {row.shape[0]} norms for a {gh} x {gw} grid"
                             f"{' plus CLS' if start else ''}")
        if rec.has_cls:
            cls.append(float(row[0]))
        patch.append(np.ascontiguousarray(row[start:].reshape(gh, gw), dtype=np.float32))
        grids.append((gh, gw))
    return BlockNorms(patch, cls if has_cls else None, grids, has_cls,
                      input_size=tuple(int(s) for s in feats.input_size), batch=int(batch) % size)


def block_norms(model, x: Tensor, *, batch: int = 0) -> BlockNorms:
    """Run ONE model.encode(x, Record(norms=True)) and return the norms of batch item `batch`."""
    with torch.inference_mode():
        feats = model.encode(x, Record(norms=True))
    return norms_from_features(feats, batch=batch)


# -- outliers -------------------------------------------------------------------------
@dataclass
class Outliers:
    """High-norm patch tokens. `rows` are (block 1-based, row, col, norm, threshold),
    sorted by block, then by norm, largest first."""

    mode: str                          # "auto" | "fixed"
    thresholds: np.ndarray             # per block
    counts: np.ndarray                 # per block
    rows: list[tuple[int, int, int, float, float]]
    k: float = DEFAULT_K
    min_ratio: float = DEFAULT_MIN_RATIO

    HEADERS = ("block", "row", "col", "norm", "threshold")

    @property
    def total(self) -> int:
        return len(self.rows)

    def in_block(self, block: int) -> list[tuple[int, int, int, float, float]]:
        return [r for r in self.rows if r[0] == block]

    def top(self, n: int = 10) -> list[tuple[int, int, int, float, float]]:
        """The n largest outliers over all blocks."""
        return sorted(self.rows, key=lambda r: -r[3])[:n]

    def table(self, limit: Optional[int] = None, digits: int = SIG_DIGITS) -> list[list]:
        """Rows for a table widget (numbers rounded), at most `limit` of them."""
        rows = self.rows if limit is None else self.rows[:limit]
        return [[b, r, c, _round_sig(n, digits), _round_sig(t, digits)] for b, r, c, n, t in rows]

    def describe(self) -> str:
        if self.mode == "fixed":
            return f"fixed threshold {_fmt(float(self.thresholds[0]))}"
        return f"auto threshold: median + {self.k:g} x 1.4826 MAD, and > {self.min_ratio:g} x median"

    def to_csv(self, path: Union[str, Path, None] = None) -> str:
        text = "block,row,col,norm,threshold\n" + "".join(
            f"{b},{r},{c},{n:.7g},{t:.7g}\n" for b, r, c, n, t in self.rows)
        if path is not None:
            Path(path).write_text(text)
        return text


def parse_threshold(value) -> Union[str, float]:
    """'auto' (or None / '') -> 'auto'; a positive finite number (or its text) -> float."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return "auto"
    if isinstance(value, bool):
        raise ThresholdError(f"threshold must be 'auto' or a positive number, got {value!r}")
    try:
        t = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ThresholdError(f"threshold must be 'auto' or a positive number, got {value!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise ThresholdError(f"threshold must be 'auto' or a positive number, got {value!r}")
    return t


def auto_threshold(norms: np.ndarray, k: float = DEFAULT_K, min_ratio: float = DEFAULT_MIN_RATIO) -> float:
    """max(median + k * 1.4826 * MAD, min_ratio * median) over the finite values."""
    v = np.asarray(norms, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("inf")
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med)))
    return max(med + k * MAD_TO_SIGMA * mad, min_ratio * med)


def find_outliers(result: BlockNorms, *, threshold="auto", k: float = DEFAULT_K,
                  min_ratio: float = DEFAULT_MIN_RATIO) -> Outliers:
    """The patch tokens whose norm is > the threshold of their block (see the module
    docstring for 'auto'); a number is one fixed threshold for every block."""
    t = parse_threshold(threshold)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
        raise ThresholdError(f"k must be a positive number, got {k!r}")
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not math.isfinite(min_ratio) \
            or min_ratio < 1:
        raise ThresholdError(f"min_ratio must be a number >= 1, got {min_ratio!r}")
    thresholds = np.empty(result.num_blocks, dtype=np.float64)
    counts = np.zeros(result.num_blocks, dtype=np.int64)
    rows = []
    for b, a in enumerate(result.patch_norms):
        tb = auto_threshold(a, k, min_ratio) if t == "auto" else float(t)
        thresholds[b] = tb
        rr, cc = np.nonzero(a > tb)          # NaN compares False: never an outlier
        vals = a[rr, cc].astype(np.float64)
        order = np.argsort(-vals, kind="stable")
        counts[b] = len(order)
        rows.extend((b + 1, int(rr[i]), int(cc[i]), float(vals[i]), tb) for i in order)
    return Outliers("auto" if t == "auto" else "fixed", thresholds, counts, rows, float(k), float(min_ratio))


# -- figures ---------------------------------------------------------------------------
def _round_sig(a, digits: int = SIG_DIGITS):
    """Round to `digits` significant digits so the JSON repr stays short (scalar or array;
    arrays come back as nested lists with None for non-finite values)."""
    scalar = np.ndim(a) == 0
    v = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(v) & (v != 0)
    mag = np.zeros_like(v)
    mag[finite] = np.floor(np.log10(np.abs(v[finite])))
    e = (digits - 1 - mag).astype(np.int64)
    out = np.where(e >= 0, np.round(v * 10.0 ** np.maximum(e, 0)) / 10.0 ** np.maximum(e, 0),
                   np.round(v / 10.0 ** np.maximum(-e, 0)) * 10.0 ** np.maximum(-e, 0))
    if scalar:
        x = float(out)
        return x if math.isfinite(x) else None
    obj = out.astype(object)
    obj[~np.isfinite(v)] = None
    return obj.tolist()


def _fmt(v: float) -> str:
    """A norm for titles and labels: 3 significant digits, no exponent below 1e5."""
    if v is None or not math.isfinite(v):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _grid_shape(n: int, cols: Optional[int]) -> tuple[int, int]:
    c = max(1, min(n, int(cols) if cols else 6))
    return int(math.ceil(n / c)), c


def heatmap_figure(result: BlockNorms, *, shared_scale: bool = True, outliers: Optional[Outliers] = None,
                   cols: Optional[int] = None, colorscale: str = COLORSCALE, digits: int = SIG_DIGITS,
                   tile_px: int = 190):
    """One Heatmap per block (in block order) in a grid of subplots, titled
    "block k · min a / max b", hover: block, row, col, norm. shared_scale: one colour
    scale (and colour bar) for all blocks; else each block spans its own min..max.
    With `outliers`, their tokens are outlined (one extra Scatter per block that has some)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = result.num_blocks
    if n == 0:
        raise NormsError("no blocks to draw")
    stats = result.stats()
    nrows, ncols = _grid_shape(n, cols)
    titles = [f"block {b + 1} · min {_fmt(stats['min'][b])} / max {_fmt(stats['max'][b])}" for b in range(n)]
    vspace = min(0.12, 0.35 / max(1, nrows - 1)) if nrows > 1 else 0.0
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=titles, horizontal_spacing=0.012,
                        vertical_spacing=vspace)
    lo, hi = np.nanmin(stats["min"]), np.nanmax(stats["max"])
    for b, a in enumerate(result.patch_norms):
        r, c = divmod(b, ncols)
        gh, gw = a.shape
        trace = dict(z=_round_sig(a, digits), name=f"block {b + 1}",
                     hovertemplate=f"block {b + 1}<br>row %{{y}}, col %{{x}}<br>norm %{{z}}<extra></extra>")
        if shared_scale:
            trace["coloraxis"] = "coloraxis"
        else:
            trace.update(colorscale=colorscale, showscale=False)
        fig.add_trace(go.Heatmap(**trace), row=r + 1, col=c + 1)
        axis = "" if b == 0 else str(b + 1)
        fig.layout[f"yaxis{axis}"].update(autorange="reversed", scaleanchor=f"x{axis}", constrain="domain",
                                          showticklabels=False, showgrid=False, zeroline=False)
        fig.layout[f"xaxis{axis}"].update(constrain="domain", showticklabels=False, showgrid=False,
                                          zeroline=False, range=[-0.5, gw - 0.5])
    if outliers is not None:
        for b in range(n):
            rows = outliers.in_block(b + 1)
            if not rows:
                continue
            r, c = divmod(b, ncols)
            fig.add_trace(go.Scatter(
                x=[o[2] for o in rows], y=[o[1] for o in rows], mode="markers", showlegend=False,
                name=f"outliers {b + 1}", customdata=[_round_sig(o[3], digits) for o in rows],
                marker=dict(symbol="square-open", size=7, color=OUTLIER_COLOR, line=dict(width=1.5)),
                hovertemplate=f"block {b + 1} outlier<br>row %{{y}}, col %{{x}}<br>norm %{{customdata}}<extra></extra>",
            ), row=r + 1, col=c + 1)
    if shared_scale:
        fig.update_layout(coloraxis=dict(colorscale=colorscale, cmin=_round_sig(lo, digits),
                                         cmax=_round_sig(hi, digits),
                                         colorbar=dict(title=dict(text="norm"), thickness=12, len=0.6)))
    fig.update_annotations(font_size=11)
    fig.update_layout(height=max(260, int(nrows * tile_px) + 80), margin=dict(l=10, r=10, t=50, b=10),
                      title=dict(text=_figure_title(result, "token norms after each block"), font_size=14),
                      plot_bgcolor="white")
    return fig


def mosaic_figure(result: BlockNorms, *, outliers: Optional[Outliers] = None, cols: Optional[int] = None,
                  colorscale: str = COLORSCALE, digits: int = SIG_DIGITS, width_px: int = 1100):
    """The page's lighter form of heatmap_figure(shared_scale=True): every block's grid tiled
    into ONE Heatmap (NaN gutters between tiles, smaller grids top-left), one Scatter for all
    outliers, titles as annotations. One trace on one pair of axes draws ~3x faster than a
    subplot per block (24 for ViT-L; bench/ui_latency.py). Hover names block, row, col and
    norm: customdata holds each cell's (block, row, col). Both arrays go as base64 typed
    arrays (float32, uint8). width_px: the plot's expected width, which sets the gutter above
    each tile that its title needs (the axes keep the cells square)."""
    import plotly.graph_objects as go

    n = result.num_blocks
    if n == 0:
        raise NormsError("no blocks to draw")
    stats = result.stats()
    nrows, ncols = _grid_shape(n, cols)
    gh = max(a.shape[0] for a in result.patch_norms)
    gw = max(a.shape[1] for a in result.patch_norms)
    cell_px = width_px / (ncols * (gw + 1))
    gap = max(1, math.ceil(18 / cell_px))                          # rows of gutter for a title
    z = np.full((nrows * (gh + gap), ncols * (gw + 1) - 1), np.nan, dtype=np.float32)
    index_type = np.uint8 if max(n, gh, gw) < 256 else np.int16
    where = np.zeros(z.shape + (3,), dtype=index_type)            # (block, row, col) of each cell

    def origin(b: int) -> tuple[int, int]:
        r, c = divmod(b, ncols)
        return c * (gw + 1), r * (gh + gap) + gap

    annotations = []
    for b, a in enumerate(result.patch_norms):
        x0, y0 = origin(b)
        h, w = a.shape
        z[y0:y0 + h, x0:x0 + w] = a
        rows, cols_ = np.mgrid[0:h, 0:w]
        where[y0:y0 + h, x0:x0 + w] = np.stack([np.full_like(rows, b + 1), rows, cols_], axis=-1)
        annotations.append(dict(x=x0 + (gw - 1) / 2, y=y0 - 0.5, xref="x", yref="y", showarrow=False,
                                yanchor="bottom", font=dict(size=11),
                                text=f"block {b + 1} · min {_fmt(stats['min'][b])} / max {_fmt(stats['max'][b])}"))
    fig = go.Figure(go.Heatmap(
        z=z, customdata=where, coloraxis="coloraxis", hoverongaps=False, name="norms",
        hovertemplate="block %{customdata[0]}<br>row %{customdata[1]}, col %{customdata[2]}<br>"
                      f"norm %{{z:.{digits}g}}<extra></extra>"))
    if outliers is not None and len(outliers.rows):
        xs, ys, data = [], [], []
        for blk, row, col, norm, _thr in outliers.rows:
            x0, y0 = origin(int(blk) - 1)
            xs.append(x0 + int(col))
            ys.append(y0 + int(row))
            data.append([int(blk), int(row), int(col), _round_sig(norm, digits)])
        fig.add_trace(go.Scatter(
            x=xs, y=ys, customdata=data, mode="markers", showlegend=False, name="outliers",
            marker=dict(symbol="square-open", size=7, color=OUTLIER_COLOR, line=dict(width=1.5)),
            hovertemplate="block %{customdata[0]} outlier<br>row %{customdata[1]}, col %{customdata[2]}<br>"
                          "norm %{customdata[3]}<extra></extra>"))
    lo, hi = np.nanmin(stats["min"]), np.nanmax(stats["max"])
    axis = dict(showticklabels=False, showgrid=False, zeroline=False, constrain="domain")
    fig.update_layout(
        coloraxis=dict(colorscale=colorscale, cmin=_round_sig(lo, digits), cmax=_round_sig(hi, digits),
                       colorbar=dict(title=dict(text="norm"), thickness=12, len=0.6)),
        xaxis=dict(axis, range=[-0.5, z.shape[1] - 0.5]),
        yaxis=dict(axis, range=[z.shape[0] - 0.5, -0.5], scaleanchor="x"),
        annotations=annotations, height=max(260, int(z.shape[0] * cell_px) + 80),
        margin=dict(l=10, r=10, t=50, b=10),
        title=dict(text=_figure_title(result, "token norms after each block"), font_size=14),
        plot_bgcolor="white")
    return fig


def _figure_title(result: BlockNorms, what: str) -> str:
    grids = sorted(set(result.grids), key=lambda g: -g[0] * g[1])
    grid = " → ".join(f"{h}x{w}" for h, w in grids)
    return f"{what} · {result.num_blocks} blocks · grid {grid}"


def stats_figure(result: BlockNorms, outliers: Optional[Outliers] = None, *, log_y: bool = False):
    """Median, 99th percentile, max (and min, CLS) of every block against the block number,
    with the outlier threshold (dashed) and, below, the outlier count per block."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    s = result.stats()
    x = s["block"].tolist()
    rows = 2 if outliers is not None else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        row_heights=[0.72, 0.28] if rows == 2 else None)
    lines = [("max", dict(color="#d62728")), ("p99", dict(color="#ff7f0e")), ("median", dict(color="#1f77b4")),
             ("min", dict(color="#7f7f7f", dash="dot"))]
    for name, line in lines:
        fig.add_trace(go.Scatter(x=x, y=_round_sig(s[name]), mode="lines+markers", name=name, line=line,
                                 hovertemplate=f"block %{{x}}<br>{name} %{{y}}<extra></extra>"), row=1, col=1)
    if s["cls"] is not None:
        fig.add_trace(go.Scatter(x=x, y=_round_sig(s["cls"]), mode="lines+markers", name="CLS",
                                 line=dict(color="#2ca02c"), marker=dict(symbol="diamond"),
                                 hovertemplate="block %{x}<br>CLS %{y}<extra></extra>"), row=1, col=1)
    if outliers is not None:
        fig.add_trace(go.Scatter(x=x, y=_round_sig(outliers.thresholds), mode="lines", name="threshold",
                                 line=dict(color="black", dash="dash"),
                                 hovertemplate="block %{x}<br>threshold %{y}<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Bar(x=x, y=outliers.counts.tolist(), name="outliers", marker_color=OUTLIER_COLOR,
                             hovertemplate="block %{x}<br>%{y} outliers<extra></extra>"), row=2, col=1)
        fig.update_yaxes(title_text="outliers", row=2, col=1, rangemode="tozero")
        fig.update_xaxes(title_text="block", row=2, col=1)
    else:
        fig.update_xaxes(title_text="block", row=1, col=1)
    fig.update_yaxes(title_text="norm", type="log" if log_y else "linear", row=1, col=1)
    title = "norm distribution per block (patch tokens)"
    if outliers is not None:
        title += f" · {outliers.describe()} · {outliers.total} outliers"
    fig.update_layout(height=480 if rows == 2 else 360, margin=dict(l=10, r=10, t=50, b=10),
                      title=dict(text=title, font_size=14), hovermode="x unified",
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    return fig


def histogram_figure(result: BlockNorms, block: int, outliers: Optional[Outliers] = None, *,
                     bins: int = 60, log_count: bool = True):
    """Histogram of one block's patch norms (block is 1-based), binned here so the figure
    stays small; the median, CLS and the block's outlier threshold are drawn as lines."""
    import plotly.graph_objects as go

    b = result.check_block(block)
    a = result.patch_norms[b].astype(np.float64).ravel()
    a = a[np.isfinite(a)]
    fig = go.Figure()
    if a.size:
        counts, edges = np.histogram(a, bins=max(1, int(bins)))
        centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        fig.add_trace(go.Bar(x=_round_sig(centers), y=counts.tolist(), width=_round_sig(widths), name="tokens",
                             marker_color="#1f77b4", customdata=np.stack([_round_sig(edges[:-1]),
                                                                         _round_sig(edges[1:])], 1).tolist(),
                             hovertemplate="norm %{customdata[0]} – %{customdata[1]}<br>%{y} tokens<extra></extra>"))
        med = float(np.median(a))
        fig.add_vline(x=med, line=dict(color="#1f77b4", dash="dot"), annotation_text=f"median {_fmt(med)}",
                      annotation_position="top left")
    if result.cls_norms is not None:
        c = result.cls_norms[b]
        fig.add_vline(x=c, line=dict(color="#2ca02c"), annotation_text=f"CLS {_fmt(c)}",
                      annotation_position="top right")
    title = f"block {block} · {a.size} patch tokens"
    if outliers is not None:
        t = float(outliers.thresholds[b])
        if math.isfinite(t):
            fig.add_vline(x=t, line=dict(color="black", dash="dash"), annotation_text=f"threshold {_fmt(t)}",
                          annotation_position="bottom right")
        title += f" · {int(outliers.counts[b])} outliers"
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=50, b=10), title=dict(text=title, font_size=14),
                      bargap=0, showlegend=False, xaxis_title="norm", yaxis_title="tokens")
    if log_count:
        fig.update_yaxes(type="log")
    return fig


def figures_html(*figs, title: str = "DPT Lab · block norms", text: str = "",
                 outliers: Optional[Outliers] = None, images: Sequence[tuple[str, np.ndarray]] = (),
                 table_limit: int = 500) -> str:
    """One standalone HTML page (plotly.js inlined: it works offline) with the figures in
    order, then the images (title, H x W x 3 uint8, embedded as PNG) and the outlier table."""
    parts = [f"<h2>{html.escape(title)}</h2>"]
    if text:
        parts.append(f"<pre>{html.escape(text)}</pre>")
    first = True
    for fig in figs:
        if fig is None:
            continue
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False,
                                 config={"displaylogo": False, "responsive": True}))
        first = False
    for name, img in images:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        parts.append(f"<h3>{html.escape(name)}</h3><img style='max-width:100%' src='data:image/png;base64,{data}'>")
    if outliers is not None:
        head = "".join(f"<th>{h}</th>" for h in Outliers.HEADERS)
        body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                       for row in outliers.table(limit=table_limit))
        more = f" (first {table_limit} of {outliers.total})" if outliers.total > table_limit else ""
        parts.append(f"<h3>Outliers: {outliers.total} tokens{more} · {html.escape(outliers.describe())}</h3>"
                     f"<table border='1' cellspacing='0' cellpadding='3'><tr>{head}</tr>{body}</table>")
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;margin:16px}td,th{text-align:right;font-size:13px}</style>"
            "</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


# -- on the image --------------------------------------------------------------------
def draw_outliers(image_rgb, meta_or_sizes, result: BlockNorms, outliers: Outliers, block: Optional[int] = None,
                  *, color=(255, 45, 85), label: bool = True) -> np.ndarray:
    """A copy of the image (H x W x 3 uint8: the original image, or the model input) with
    the outlier patches outlined: those of one 1-based `block`, or of every block (None;
    a patch flagged in several blocks is drawn once, labelled with how many). Each block's
    boxes come from its own grid (SwinV2: 4, 8, 16, 32 input pixels by stage)."""
    from PIL import Image, ImageDraw

    arr = np.asarray(image_rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise NormsError(f"expected an H x W x 3 RGB image, got shape {arr.shape}")
    arr = arr.astype(np.uint8) if arr.dtype == np.uint8 else np.clip(arr * (255 if arr.max() <= 1 else 1), 0, 255) \
        .astype(np.uint8)
    h, w = arr.shape[:2]
    image_size, input_size = meta_sizes(meta_or_sizes)
    if image_size is not None and (h, w) not in (image_size, input_size):
        raise NormsError(f"the image is {w}x{h}, but meta describes a {image_size[1]}x{image_size[0]} image "
                         f"and a {input_size[1]}x{input_size[0]} input")
    if block is not None:
        result.check_block(block)
    boxes: dict[tuple, int] = {}
    for b, r, c, _, _ in outliers.rows:
        if block is not None and b != block:
            continue
        if b > result.num_blocks:
            raise BlockError(f"outlier of block {b}, but this result has blocks 1..{result.num_blocks}")
        key = (result.grids[b - 1], r, c)
        boxes[key] = boxes.get(key, 0) + 1
    out = Image.fromarray(arr.copy())
    draw = ImageDraw.Draw(out)
    lw = max(1, round(min(h, w) / 250))
    # larger patches first, so the finer SwinV2 stages' boxes stay on top
    for (grid, r, c), count in sorted(boxes.items(), key=lambda kv: kv[0][0][0] * kv[0][0][1]):
        x0, y0, x1, y1 = patch_box((h, w), grid, r, c)
        draw.rectangle([x0 - lw, y0 - lw, x1 + lw, y1 + lw], outline=(0, 0, 0), width=lw)
        draw.rectangle([x0, y0, x1, y1], outline=tuple(color), width=max(1, min(lw, x1 - x0 + 1)))
        if label and block is None and count > 1 and x1 - x0 >= 12:
            draw.text((x0 + lw + 1, y0 + lw), str(count), fill=tuple(color))
    return np.asarray(out)


# -- text ------------------------------------------------------------------------------
def summary(result: BlockNorms, outliers: Optional[Outliers] = None, top: int = 5) -> str:
    """A few lines: blocks, grids, norm range of the last block, outliers per block and the top ones."""
    s = result.stats()
    grids = sorted(set(result.grids), key=lambda g: -g[0] * g[1])
    lines = [f"{result.num_blocks} blocks, grid {' → '.join(f'{a}x{b}' for a, b in grids)}"
             f"{', with CLS' if result.has_cls else ', no CLS'}",
             f"last block: median {_fmt(s['median'][-1])}, p99 {_fmt(s['p99'][-1])}, max {_fmt(s['max'][-1])}"
             + (f", CLS {_fmt(s['cls'][-1])}" if s["cls"] is not None else "")]
    if outliers is not None:
        per = ", ".join(f"{b + 1}:{int(n)}" for b, n in enumerate(outliers.counts) if n)
        lines.append(f"{outliers.total} outliers ({outliers.describe()})" + (f"; per block {per}" if per else ""))
        for b, r, c, n, t in outliers.top(top):
            lines.append(f"  block {b} row {r} col {c}: norm {_fmt(n)} (threshold {_fmt(t)})")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------
def _threshold_arg(text: str):
    try:
        return parse_threshold(text)
    except ThresholdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `norms` on an argparse subparsers object; sets func=run_cli."""
    p = subparsers.add_parser(
        "norms", help="token norms after every block, with the high-norm outliers",
        description="L2 norm of every token after every transformer block, as an HTML page of interactive "
                    "figures, with the high-norm outlier tokens found and drawn on the image.")
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="checkpoint file or -hf folder")
    p.add_argument("--out", default="norms.html", help="standalone HTML page (default norms.html)")
    p.add_argument("--csv", default=None, help="also write every norm as CSV (block,row,col,norm; CLS as row -1)")
    p.add_argument("--threshold", type=_threshold_arg, default="auto",
                   help="outlier threshold: 'auto' (median + k robust sigmas per block) or a norm, e.g. 150")
    p.add_argument("--k", type=float, default=DEFAULT_K, help=f"robust sigmas for 'auto' (default {DEFAULT_K:g})")
    p.add_argument("--block", type=int, default=None, help="block 1..L for the histogram (default: the last)")
    p.add_argument("--per-block-scale", action="store_true", help="colour each heatmap by its own min..max")
    p.add_argument("--overlay", default=None, help="also write the image with the outliers outlined (PNG)")
    p.add_argument("--base-size", type=int, default=None, help="processing size (default: the model's)")
    p.add_argument("--stretch", action="store_true", help="stretch to a square input instead of keeping the aspect")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    from PIL import Image

    import dpt_lab

    from . import imaging

    model = dpt_lab.load_model(args.model)
    rgb = imaging.load_image(args.image)
    depth = int(model.info.num_blocks)
    if args.block is not None and not 1 <= args.block <= depth:
        raise BlockError(f"--block {args.block} is out of range: this model has blocks 1..{depth}")
    x, meta = model.preprocess(rgb, base_size=args.base_size, keep_aspect=False if args.stretch else None)
    result = block_norms(model, x)
    block = result.num_blocks if args.block is None else args.block
    if not 1 <= block <= result.num_blocks:
        raise BlockError(f"--block {block} is out of range: this model has blocks 1..{result.num_blocks}")
    out = find_outliers(result, threshold=args.threshold, k=args.k)
    overlay = draw_outliers(rgb, meta, result, out)
    text = summary(result, out)
    name = Path(args.image).name
    page = figures_html(
        heatmap_figure(result, shared_scale=not args.per_block_scale, outliers=out),
        stats_figure(result, out), histogram_figure(result, block, out),
        title=f"DPT Lab · block norms · {name} · {getattr(model.info, 'name', '') or Path(args.model).name}",
        text=text, outliers=out, images=[("outliers on the image (all blocks)", _thumbnail(overlay))])
    Path(args.out).write_text(page, encoding="utf-8")
    written = [args.out]
    if args.csv:
        result.to_csv(args.csv)
        written.append(args.csv)
    if args.overlay:
        Image.fromarray(overlay).save(args.overlay)
        written.append(args.overlay)
    print(text)
    print(f"wrote {', '.join(written)}")
    return 0


def _thumbnail(img: np.ndarray, longest: int = 1024) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) <= longest:
        return img
    s = longest / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS))


def main(argv=None) -> int:
    """`python -m dpt_lab.norms IMAGE ...` (the same as `python -m dpt_lab norms ...`)."""
    from .cli import run_one

    return run_one("norms", argv)

if __name__ == "__main__":
    sys.exit(main())
