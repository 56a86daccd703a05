"""The choices the user picks from (colormaps, fusion factors: labels, range, presets).

Plain data without torch, so that the app can build and serve its page before torch
loads; imaging.py, fusion.py and session.py all take them from here.
"""

from __future__ import annotations

COLORMAPS = ("turbo", "viridis", "inferno", "magma", "plasma", "spectral", "gray")

# fusion factor i multiplies the map entering fusion block i (fusion.py)
FUSION_LABELS = (
    "1 · finest (4x patch grid): detail",
    "2 · fine (2x patch grid)",
    "3 · coarse (patch grid)",
    "4 · coarsest (1/2 patch grid): layout",
)
FUSION_MIN, FUSION_MAX = -5.0, 5.0
FUSION_IDENTITY = (1.0, 1.0, 1.0, 1.0)
FUSION_PRESETS = {
    "reset": FUSION_IDENTITY,
    **{f"solo {i + 1}": tuple(1.0 if j == i else 0.0 for j in range(4)) for i in range(4)},
    **{f"drop {i + 1}": tuple(0.0 if j == i else 1.0 for j in range(4)) for i in range(4)},
}
