"""Resampling of images under affine maps: one matrix per view, one function (`warp`).

Every geometric step (resize, random resized crop, translation, shear, horizontal flip) is one
2x3 affine matrix that maps *output* pixel centres to *input* coordinates, and one function,
`warp`, resamples with it. Coordinates are (x = column, y = row) with pixel `i` centred at `i`;
a plain resize is `x_in = (x_out + 0.5) * in / out - 0.5` (PIL, and torch's
`interpolate(bilinear, align_corners=False)`).

An axis-aligned map (resize, crop, flip, translation) is resampled one axis at a time with
Pillow's BILINEAR filter, the one transformers' image processors use: a triangle whose
half-width is max(scale, 1) input pixels (scale = input pixels per output pixel along that
axis), clipped to the image and renormalized. Downsampling is therefore anti-aliased, and a
resize or crop equals `PIL.Image.resize(..., BILINEAR, box=...)` on float images; upsampling
(Fashion-MNIST 28 -> 112 / 224) is plain two-tap bilinear, which is what that filter reduces to.
A sample farther outside the image than the half-width takes the nearest edge pixel (PIL
rejects such boxes; this is replicate padding, as for upsampling). A sheared map (training
augmentation with `shear_degrees`) is plain bilinear with replicated edges; one that shrinks
the image is first shrunk along each axis it shrinks with that filter onto a grid that steps
as the map does, so a sheared view is anti-aliased too (`_warp_prefiltered`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Box = tuple[float, float, float, float]  # (x0, y0, width, height) in input pixel-edge units


def _size(out_size: int | Sequence[int]) -> tuple[int, int]:
    return (out_size, out_size) if isinstance(out_size, (int, np.integer)) else tuple(out_size)


def _axis_weights(coords: np.ndarray, n: int):
    """Bilinear taps along one axis: (lower index, upper index, weight of the upper) with
    indices clamped to [0, n - 1] (replicated edges); weights float32 [..., 1]."""
    lower = np.floor(coords)
    weight = (coords - lower).astype(np.float32)[..., None]
    lower = lower.astype(np.intp)
    return np.clip(lower, 0, n - 1), np.clip(lower + 1, 0, n - 1), weight


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=False)
    return a + (b.astype(np.float32, copy=False) - a) * t  # exact at t = 0 and t = 1


def filter_taps(coords: np.ndarray, scale: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's BILINEAR filter along one axis (libImaging/Resample.c, `precompute_coeffs`).

    Sample `j` at input coordinate `coords[j]` (pixel centres at integers) weighs pixel `i` by
    `max(0, 1 - |i - coords[j]| / r)` with `r = max(|scale|, 1)`, over the pixels of the
    image only, normalized to sum to 1. A sample with no pixel under its triangle (more than
    `r` outside the image) takes the nearest edge pixel.

    Args:
      coords: float64 [N] sample positions in input pixels.
      scale: input pixels per output pixel along the axis (negative when flipped).
      n: the input's length along the axis.

    Returns:
      (indices intp [N, K] in [0, n - 1], weights float32 [N, K]), K = ceil(2 r) + 1.
    """
    radius = max(abs(float(scale)), 1.0)
    index = (np.floor(coords - radius) + 1)[:, None] + np.arange(math.ceil(2 * radius) + 1)
    weight = np.maximum(1.0 - np.abs(index - coords[:, None]) / radius, 0.0)  # [N, K]
    weight[(index < 0) | (index >= n)] = 0.0  # clipped to the image, as PIL
    total = weight.sum(axis=1)  # [N]
    index = np.clip(index, 0, n - 1).astype(np.intp)
    outside = total == 0
    index[outside, 0] = np.clip(np.round(coords[outside]), 0, n - 1)
    weight[outside, 0] = total[outside] = 1.0
    return index, (weight / total[:, None]).astype(np.float32)


_BAND_ROWS = 8  # output samples per matrix product when shrinking (see `_shrink_rows`)


def _shrink_rows(rows: np.ndarray, coords: np.ndarray, scale: float) -> np.ndarray:
    """`rows` [n, M] (any real dtype) resampled along its first axis at `coords` [N] with the
    widened filter of `filter_taps`: float32 [N, M].

    Each group of `_BAND_ROWS` consecutive samples reads one contiguous band of input rows, so
    the group is one float32 matrix product (its [G, band] weights, zero outside each sample's
    taps, times the band's [band, M] rows): a large photo shrunk to 224 pixels is a few dozen
    BLAS calls over the rows it reads once, rather than a gather per filter tap (one tap spans
    2 |scale| + 1 rows)."""
    index, weight = filter_taps(coords, scale, rows.shape[0])  # [N, K]
    out = np.empty((len(coords), rows.shape[1]), np.float32)
    for g in range(0, len(coords), _BAND_ROWS):
        idx, w = index[g : g + _BAND_ROWS], weight[g : g + _BAND_ROWS]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        band = np.zeros((len(idx), hi - lo), np.float32)
        np.add.at(band, (np.arange(len(idx))[:, None], idx - lo), w)  # clipped taps repeat
        np.matmul(band, rows[lo:hi].astype(np.float32, copy=False), out=out[g : g + len(idx)])
    return out


def _span(coords: np.ndarray, scale: float, n: int) -> tuple[int, int]:
    """[lo, hi): the input indices `_resample_axis` reads along an axis of length `n`. Cut to
    them (with `coords - lo`), the axis gives the same taps and weights: none reaches outside."""
    if abs(scale) <= 1:
        lower, upper, _ = _axis_weights(coords, n)
        return int(lower.min()), int(upper.max()) + 1
    index, _ = filter_taps(coords, scale, n)
    return int(index.min()), int(index.max()) + 1


def _resample_axis(image: np.ndarray, coords: np.ndarray, scale: float, axis: int) -> np.ndarray:
    """`image` [H, W, C] resampled along `axis` (0: rows, 1: columns) at `coords` [N]: two-tap
    bilinear when not shrinking (|scale| <= 1), else the widened filter of `filter_taps`.
    Returns float32 with that axis of length N."""
    n = image.shape[axis]
    if abs(scale) <= 1:
        lower, upper, weight = _axis_weights(coords, n)  # [N], [N], [N, 1]
        if axis == 0:
            return _lerp(image[lower], image[upper], weight[..., None])
        return _lerp(image[:, lower], image[:, upper], weight)
    if axis == 1:  # columns as rows: [W, H, C], resampled, and back
        return _resample_axis(image.transpose(1, 0, 2), coords, scale, 0).transpose(1, 0, 2)
    h, w, c = image.shape
    return _shrink_rows(image.reshape(h, w * c), coords, scale).reshape(len(coords), w, c)


def warp(
    image: np.ndarray,
    matrix: np.ndarray,
    out_size: int | Sequence[int],
    *,
    _force_general: bool = False,  # tests: check the axis-aligned path against the general one
) -> np.ndarray:
    """Resampling of `image` under an affine map (see the module docstring).

    Axis-aligned maps use Pillow's BILINEAR filter (anti-aliased when shrinking an axis,
    `filter_taps`); others plain bilinear. Both replicate the edges beyond the filter.

    Args:
      image: uint8 (or any real dtype) [H, W, C] or [H, W].
      matrix: 2x3; `[x_in, y_in] = matrix @ [x_out, y_out, 1]` for output pixel centres.
      out_size: S (square) or (height, width).

    Returns:
      float32 [S, S, C] in the input's value range (not rounded).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    oh, ow = _size(out_size)
    m = np.asarray(matrix, np.float64)
    xs = np.arange(ow, dtype=np.float64)
    ys = np.arange(oh, dtype=np.float64)
    if m[0, 1] == 0 and m[1, 0] == 0 and not _force_general:
        # One axis at a time. When neither axis shrinks: along x, then y, as PIL, the same
        # float32 operations on the same values as the general path below (the result is
        # bit-identical), with far fewer gathers. When y shrinks, y goes first: the first pass
        # then reads whole rows (`_shrink_rows`), and x runs on its output.
        x_in, y_in = m[0, 0] * xs + m[0, 2], m[1, 1] * ys + m[1, 2]
        # Cut to the pixels the taps read (same taps, `_span`): the centred square of a
        # 20000 x 40 strip costs what a 40 x 40 image does, not the strip.
        x0, x1 = _span(x_in, m[0, 0], image.shape[1])
        y0, y1 = _span(y_in, m[1, 1], image.shape[0])
        image, x_in, y_in = image[y0:y1, x0:x1], x_in - x0, y_in - y0
        if abs(m[1, 1]) > 1:
            rows = _resample_axis(image, y_in, m[1, 1], axis=0)  # [oh, W, C]
            return _resample_axis(rows, x_in, m[0, 0], axis=1)
        cols = _resample_axis(image, x_in, m[0, 0], axis=1)  # [H, ow, C]
        return _resample_axis(cols, y_in, m[1, 1], axis=0)  # [oh, ow, C]
    if not _force_general and max(_shrink_factors(m)) > 1:
        return _warp_prefiltered(image, m, (oh, ow), xs, ys)
    return _warp_general(image, m, xs, ys)


def _shrink_factors(m: np.ndarray) -> tuple[float, float]:
    """Input pixels per output pixel of a map along x and y: the largest step of x_in (and of
    y_in) for one output pixel along either output axis."""
    return max(abs(m[0, 0]), abs(m[0, 1])), max(abs(m[1, 0]), abs(m[1, 1]))


def _warp_prefiltered(
    image: np.ndarray, m: np.ndarray, out_hw: tuple[int, int], xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """A sheared map that shrinks, without aliasing, as a mipmap would: the input region the
    view covers is first shrunk along each axis by the map's factor with the anti-aliased
    axis-aligned filter, onto a grid that steps as the map does from output pixel (0, 0), then
    sampled bilinearly by what remains of the map (about one grid pixel per output pixel).
    Without shear that remainder is a whole-pixel shift (and flip): the axis-aligned result
    inside the image (past its edge the grid, cut to the image, replicates its own filtered
    edge values rather than the raw edge pixels). An axis the map does not shrink keeps the
    image's own pixels (a grid of step 1 on pixel centres), so that it is interpolated once,
    by the remainder, as it is without shear."""
    h, w = image.shape[:2]
    oh, ow = out_hw
    fx, fy = _shrink_factors(m)
    ox, oy = (m[0, 2] if fx > 1 else 0.0), (m[1, 2] if fy > 1 else 0.0)  # grid origins
    fx, fy = max(fx, 1.0), max(fy, 1.0)
    corners = np.array([[-0.5, -0.5], [ow - 0.5, -0.5], [-0.5, oh - 0.5], [ow - 0.5, oh - 0.5]])
    x_in, y_in = (corners @ m[:, :2].T + m[:, 2]).T  # where the view's corners fall
    # Grid steps k from the origin (output pixel (0, 0)'s input position along a shrunk axis),
    # covering the view and a filter width around it, within the image (-0.5 .. n - 0.5).
    kx = _grid_steps(x_in.min() - fx, x_in.max() + fx, ox, fx, w)
    ky = _grid_steps(y_in.min() - fy, y_in.max() + fy, oy, fy, h)
    if kx is None or ky is None:  # the view lies outside the image: edge pixels, unfiltered
        return _warp_general(image, m, xs, ys)
    grid = np.array([[fx, 0.0, ox + kx[0] * fx], [0.0, fy, oy + ky[0] * fy]])
    inner = warp(image, grid, (ky[1] - ky[0] + 1, kx[1] - kx[0] + 1))  # anti-aliased
    rest = np.linalg.solve(np.vstack([grid, [0, 0, 1]]), np.vstack([m, [0, 0, 1]]))[:2]
    return _warp_general(inner, rest, xs, ys)


def _grid_steps(lo: float, hi: float, origin: float, step: float, n: int):
    """(first, last) k with origin + k * step in [lo, hi] widened to whole steps and cut to the
    image's [-0.5, n - 0.5]; None when that leaves nothing."""
    lo, hi = max(lo, -0.5), min(hi, n - 0.5)
    first, last = math.floor((lo - origin) / step), math.ceil((hi - origin) / step)
    return (first, last) if first <= last and lo <= hi else None


def _warp_general(image: np.ndarray, m: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Any affine map: four gathers per output pixel from the image padded by one replicated
    pixel, so that coordinates clamped to [-1, W - 1] need no per-tap index clipping."""
    h, w, c = image.shape
    wp = w + 2
    # A small image is converted to float32 once, rather than the four [S, S, C] gathers.
    small = h * w <= 4 * len(xs) * len(ys)
    padded = np.empty((h + 2, wp, c), np.float32 if small else image.dtype)
    padded[1:-1, 1:-1] = image
    padded[0, 1:-1], padded[-1, 1:-1] = image[0], image[-1]
    padded[:, 0], padded[:, -1] = padded[:, 1], padded[:, -2]
    flat = padded.reshape(-1, c)  # [(H + 2) * (W + 2), C]
    if c == 1:
        flat = flat[:, 0]  # 1-D gathers are several times faster than row gathers
    x_in = np.clip((m[0, 0] * xs + m[0, 2])[None, :] + (m[0, 1] * ys)[:, None], -1, w - 1)
    y_in = np.clip((m[1, 0] * xs)[None, :] + (m[1, 1] * ys + m[1, 2])[:, None], -1, h - 1)
    x0, y0 = np.floor(x_in), np.floor(y_in)  # [S, S]
    wx = (x_in - x0).astype(np.float32)
    wy = (y_in - y0).astype(np.float32)
    if c != 1:
        wx, wy = wx[..., None], wy[..., None]  # [S, S, 1]
    y0 *= wp  # flat index of the top-left tap, computed in place (exact in float64)
    y0 += x0
    y0 += wp + 1
    tl = y0.astype(np.intp)
    top = _lerp(flat[tl], flat[tl + 1], wx)  # [S, S(, C)]
    bottom = _lerp(flat[tl + wp], flat[tl + (wp + 1)], wx)
    out = top + (bottom - top) * wy
    return out[..., None] if c == 1 else out


def box_matrix(
    box: Box,
    out_size: int | Sequence[int],
    *,
    flip: bool = False,
    shear_degrees: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """The 2x3 matrix that maps an output grid onto a box of the input.

    Args:
      box: (x0, y0, width, height) in input pixel-edge units: the whole image is (0, 0, W, H).
        It may reach past the image (translation): those samples replicate the edge.
      out_size: S or (height, width) of the output.
      flip: mirror horizontally (output column j samples the box's column from the right).
      shear_degrees: (x, y) shear angles about the box centre, in input pixels:
        x_in += tan(ax) * dy, y_in += tan(ay) * dx for offsets (dx, dy) from the centre.

    Returns:
      float64 [2, 3] for `warp`.
    """
    bx, by, bw, bh = (float(v) for v in box)
    oh, ow = _size(out_size)
    # Pixel-centre convention per axis: x_in = bx + bw * u - 0.5 with u = (x_out + 0.5) / ow,
    # or u -> 1 - u when flipped. Written out (not as a product of matrices) so that a plain
    # resize or a flip has exact coefficients.
    sx, sy = bw / ow, bh / oh
    tx = bx - 0.5 + (bw - 0.5 * sx if flip else 0.5 * sx)
    m = np.array([[-sx if flip else sx, 0.0, tx], [0.0, sy, by - 0.5 + 0.5 * sy]])
    ax, ay = shear_degrees
    if ax or ay:
        cx, cy = bx + bw / 2 - 0.5, by + bh / 2 - 0.5  # box centre, pixel-centre units
        shear = np.array([[1.0, math.tan(math.radians(ax))], [math.tan(math.radians(ay)), 1.0]])
        m = shear @ (m - np.array([[0, 0, cx], [0, 0, cy]]))
        m[:, 2] += (cx, cy)
    return m


def resize_matrix(in_hw: Sequence[int], out_size: int | Sequence[int]) -> np.ndarray:
    """The plain resize of a whole [H, W] image: `box_matrix((0, 0, W, H), out_size)`."""
    h, w = in_hw
    return box_matrix((0.0, 0.0, float(w), float(h)), out_size)


def center_square(h: int, w: int) -> Box:
    """The centred square box of side min(h, w) (the evaluation view)."""
    side = min(h, w)
    return ((w - side) / 2, (h - side) / 2, float(side), float(side))
