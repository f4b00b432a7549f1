"""The synthetic data set's drawing kit: its 16 shape families as signed distance functions, and colour.

Every shape is a signed distance (negative inside) in the shape's local units (radius about 1),
so the renderer (``synthetic.render_class``) can rotate, scale and antialias any of them the same
way: coverage is a clipped linear ramp of the distance over one pixel.
"""

from __future__ import annotations

import math

import numpy as np

FAMILY_NAMES = (
    "disc",
    "ring",
    "square",
    "triangle",
    "cross",
    "star",
    "stripes",
    "checker",
    "ellipse",
    "l_shape",
    "arrow",
    "hexagon",
    "crescent",
    "frame",
    "clover",
    "wave",
)


def _circle(u, v, r):
    return np.hypot(u, v) - r


def _box(u, v, hx, hy):
    qx, qy = np.abs(u) - hx, np.abs(v) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _star(u, v, r, n, m):
    """Regular ``n``-pointed star of outer radius ``r``; ``m = 2`` gives the regular polygon (iq)."""
    an, en = math.pi / n, math.pi / m
    acs, ecs = (math.cos(an), math.sin(an)), (math.cos(en), math.sin(en))
    bn = np.mod(np.arctan2(u, v), 2 * an) - an
    rho = np.hypot(u, v)
    px = rho * np.cos(bn) - r * acs[0]
    py = rho * np.abs(np.sin(bn)) - r * acs[1]
    t = np.clip(-(px * ecs[0] + py * ecs[1]), 0.0, r * acs[1] / ecs[1])
    px, py = px + ecs[0] * t, py + ecs[1] * t
    return np.hypot(px, py) * np.sign(px)


def _convex(u, v, vertices):
    """Convex polygon (vertices counter-clockwise): the largest signed distance to an edge line."""
    d = None
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
        ex, ey = bx - ax, by - ay
        edge = ((u - ax) * ey - (v - ay) * ex) / math.hypot(ex, ey)
        d = edge if d is None else np.maximum(d, edge)
    return d


def _checker_sign(x):
    """Signed distance to the nearest cell boundary (cells of width 1), positive in even cells."""
    t = np.mod(x, 2.0) - 1.0
    return -np.sign(t + 1e-9) * (0.5 - np.abs(np.abs(t) - 0.5))


def _mix(a: float, b: float, p: float) -> float:
    """``a`` at ``p = 0``, ``b`` at ``p = 1`` (both exactly), linear in between."""
    return a * (1 - p) + b * p


def family_sdf(family: int, u, v, p: float):
    """The shape of ``family`` with proportion ``p``, as a signed distance in local units.

    ``p`` is the proportion bit (0 or 1) or, for ``"continuous"`` classes, a number in
    ``[0, 1]``: shapes with a continuous detail (widths, corner radius, aspect, offset)
    interpolate it, discrete ones (point, bar, cell and lobe counts, two triangle and hexagon
    variants, the disc's cut) take the variant nearer to ``p``.
    """
    name = FAMILY_NAMES[family]
    bit = int(p >= 0.5)
    if name == "disc":  # full disc vs. disc with a flat cut
        d = _circle(u, v, 0.95)
        return d if bit == 0 else np.maximum(d, u - 0.45)
    if name == "ring":  # thin vs. thick
        w = _mix(0.11, 0.24, p)
        return np.abs(_circle(u, v, 0.95 - w)) - w
    if name == "square":  # sharp vs. rounded corners
        r = _mix(0.0, 0.32, p)
        return _box(u, v, 0.78 - r, 0.78 - r) - r
    if name == "triangle":  # equilateral vs. tall isosceles
        if bit == 0:
            return _convex(u, v + 0.25, [(-0.95, -0.55), (0.95, -0.55), (0.0, 1.1)])
        return _convex(u, v + 0.2, [(-0.6, -0.75), (0.6, -0.75), (0.0, 1.15)])
    if name == "cross":  # thin vs. thick arms
        w = _mix(0.19, 0.34, p)
        return np.minimum(_box(u, v, 0.95, w), _box(u, v, w, 0.95))
    if name == "star":  # 5 vs. 6 points
        n = (5, 6)[bit]
        return _star(u, v, 1.05, n, 0.42 * n)
    if name == "stripes":  # 3 vs. 4 bars in a square window
        k = (3, 4)[bit]
        period = 1.7 / k
        bars = np.abs(np.mod(u + 0.85, period) - period / 2) - period / 4
        return np.maximum(_box(u, v, 0.85, 0.85), bars)
    if name == "checker":  # 3×3 vs. 4×4 cells
        k = (3, 4)[bit]
        cell = 1.7 / k
        su, sv = _checker_sign((u + 0.85) / cell) * cell, _checker_sign((v + 0.85) / cell) * cell
        cells = -np.sign(su * sv) * np.minimum(np.abs(su), np.abs(sv))
        return np.maximum(_box(u, v, 0.85, 0.85), cells)
    if name == "ellipse":  # aspect 1.7 vs. 2.4
        a, b = 1.0, _mix(0.6, 0.42, p)
        return (np.hypot(u / a, v / b) - 1.0) * b
    if name == "l_shape":  # thin vs. thick legs
        w = _mix(0.3, 0.5, p)
        u, v = u - 0.3, v - 0.3
        vertical = _box(u + 0.8 - w / 2, v, w / 2, 0.8)
        horizontal = _box(u, v + 0.8 - w / 2, 0.8, w / 2)
        return np.minimum(vertical, horizontal)
    if name == "arrow":  # narrow vs. wide head
        hw = _mix(0.42, 0.68, p)
        shaft = _box(u + 0.35, v, 0.55, 0.14)
        head = _convex(u, v, [(0.15, -hw), (0.95, 0.0), (0.15, hw)])
        return np.minimum(shaft, head)
    if name == "hexagon":  # regular vs. elongated
        if bit == 0:
            return _star(u, v, 0.95, 6, 2.0)
        return _star(u / 1.25, v / 0.8, 0.9, 6, 2.0) * 0.8
    if name == "crescent":  # thin vs. thick
        offset = _mix(0.42, 0.65, p)
        return np.maximum(_circle(u, v, 0.95), -_circle(u - offset, v, 0.85))
    if name == "frame":  # thin vs. thick border
        w = _mix(0.16, 0.32, p)
        return np.maximum(_box(u, v, 0.8, 0.8), -_box(u, v, 0.8 - w, 0.8 - w))
    if name == "clover":  # 3 vs. 4 lobes
        k = (3, 4)[bit]
        d = _circle(u, v, 0.3)
        for i in range(k):
            angle = 2 * math.pi * i / k
            d = np.minimum(d, _circle(u - 0.5 * math.cos(angle), v - 0.5 * math.sin(angle), 0.45))
        return d
    if name == "wave":  # 1 vs. 1.5 periods
        omega = 2 * math.pi * _mix(1.0, 1.5, p) / 1.8
        amp = 0.35
        slope = amp * omega * np.cos(omega * u)
        band = np.abs(v - amp * np.sin(omega * u)) / np.sqrt(1 + slope * slope) - 0.15
        return np.maximum(band, np.abs(u) - 0.9)
    raise ValueError(f"unknown family {family}")


def hsv_to_rgb(h, s, v):
    """Vectorised HSV → RGB; inputs broadcast, output has a trailing axis of 3."""
    h6 = np.asarray(h, np.float32)[..., None] * 6.0
    k = np.mod(np.array([5.0, 3.0, 1.0], np.float32) + h6, 6.0)
    f = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    v = np.asarray(v, np.float32)[..., None]
    s = np.asarray(s, np.float32)[..., None]
    return v - v * s * f


def over(image, alpha, colour):
    """Alpha-composite ``colour`` (broadcast to image) onto ``image`` with coverage ``alpha``."""
    a = alpha[..., None]
    return image * (1.0 - a) + colour * a
