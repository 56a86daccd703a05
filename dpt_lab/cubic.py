"""Keys' cubic convolution kernel (a = -0.75), the one behind OpenCV's INTER_CUBIC and
torch's bicubic resize. Used by the OpenCV-exact image resize (imaging.py), its ONNX graph
(export.py) and DINOv2's position-embedding resize (encoders/dinov2.py).

Pure arithmetic, so it takes numpy arrays and tensors alike and keeps float32 as float32:
every constant below is exact in float32, and the operations are in the order the C++
kernels use, so the weights are theirs to the bit.
"""

from __future__ import annotations

A = -0.75


def _near(d):   # |d| <= 1: (a+2)|d|^3 - (a+3)|d|^2 + 1
    return ((A + 2) * d - (A + 3)) * d * d + 1


def _far(d):    # 1 < |d| < 2: a|d|^3 - 5a|d|^2 + 8a|d| - 4a
    return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A


def weights(t, opencv: bool):
    """The four tap weights (for source offsets -1, 0, 1, 2) at fractional position t.

    The two libraries differ in the last weight only: OpenCV makes the four sum to one
    (w3 = 1 - w0 - w1 - w2), torch evaluates the kernel at 2 - t."""
    w0, w1, w2 = _far(t + 1), _near(t), _near(1 - t)
    w3 = 1 - w0 - w1 - w2 if opencv else _far((1 - t) + 1)
    return w0, w1, w2, w3
