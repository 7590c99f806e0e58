"""The ten category scenes of the synthetic micrographs: geometry helpers and one renderer per category of
semivlm.data.CATEGORIES. A renderer draws a `Scene` (height, albedo, mask of the counted objects, geometric truth in
pixels) and knows which defects it can carry; data_prep/micrographs.py turns the scene into an SEM- or TEM-like image.

Conventions: coordinates are image pixels, x right, y down, origin top-left; `orientation` is the axis of elongated
features in 0..180, counter-clockwise from +x as seen on screen (None when no axis dominates); sizes are
equivalent-circle diameters (particles, agglomerates, cells, pores, grains) or widths (wires, fibres, lines,
fingers, tip bases). Lengths in pixels scale with sqrt(size / 512), so a small render looks like a zoomed-out
large one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from semivlm.data import CATEGORIES

DEFECT_TYPES = ("line_bridging", "missing_feature", "contamination_particle", "crack")
F32 = np.float32


@dataclass
class Scene:
    """What a category renderer draws: height (0 substrate .. ~1 top), albedo (material signal), the mask of the
    counted objects, and the geometric truth in pixels."""
    size: int
    s: float
    h: np.ndarray | None = None
    a: np.ndarray | None = None
    mask: np.ndarray | None = None
    sizes_px: list = field(default_factory=list)
    count: int = 0
    orientation: float | None = None
    porosity: float | None = None
    pitch_px: float | None = None
    line_width_px: float | None = None
    defects: list = field(default_factory=list)
    defect_kinds: tuple = ("contamination_particle",)   # what this scene can carry
    hooks: dict = field(default_factory=dict)           # kind -> callable(rng) drawing that defect


# ------------------------------------------------------------------------------------------------------ helpers
def canvas(size: int, value: float = 0.0, mode: str = "F"):
    img = Image.new(mode, (size, size), value)
    return img, ImageDraw.Draw(img)


def arr(img) -> np.ndarray:
    return np.array(img, dtype=F32)


@lru_cache(maxsize=8)
def grid(size: int):
    y, x = np.mgrid[0:size, 0:size].astype(F32)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def smooth_field(rng, size: int, corr_px: float) -> np.ndarray:
    """Zero-mean, about unit-variance random field with correlation length ~corr_px: low-res noise, blurred and
    normalised there, then bicubic up (cheap at any correlation length)."""
    n = max(2, int(round(2 * size / max(corr_px, 1.0))))
    low = ndi.gaussian_filter(rng.standard_normal((n + 6, n + 6), dtype=F32), 1.0, mode="wrap")
    low = (low - low.mean()) / (low.std() + 1e-6)
    return np.array(Image.fromarray(low).resize((size, size), Image.BICUBIC, box=(3, 3, n + 3, n + 3)))


@lru_cache(maxsize=1)
def _gauss_table() -> np.ndarray:
    """Standard-normal quantiles at 4096 levels: noise by table lookup is 3x cheaper than drawing normals."""
    from statistics import NormalDist
    q = (np.arange(4096) + 0.5) / 4096
    return np.array([NormalDist().inv_cdf(float(v)) for v in q], dtype=F32)


def gauss_noise(rng, shape) -> np.ndarray:
    return _gauss_table()[rng.integers(0, 4096, shape, dtype=np.uint16)]


@lru_cache(maxsize=64)
def _unit(nv: int):
    t = np.linspace(0, 2 * math.pi, nv, endpoint=False)
    return np.cos(t), np.sin(t)


def shape_rel(r, rng, nv=24, aspect=1.0, rough=0.0, rot=None):
    """Polygon vertices relative to its centre: nv vertices at radius r, stretched by aspect, radial roughness."""
    rot = rng.uniform(0, 2 * math.pi) if rot is None else rot
    cx, sx = _unit(nv)
    rr = r * (1 + rough * rng.uniform(-1, 1, nv)) if rough else r
    px, py = rr * cx * aspect, rr * sx / aspect
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([c * px - s * py, s * px + c * py], 1)


def shape_pts(x, y, r, rng, nv=24, aspect=1.0, rough=0.0, rot=None):
    return shape_rel(r, rng, nv, aspect, rough, rot) + (x, y)


def poly_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]) + x[-1] * y[0] - y[-1] * x[0]))


def flat(p) -> list:
    return np.asarray(p, dtype=float).ravel().tolist()


def place(rng, radii, size, gap, rounds=6):
    """Disc centres, fully inside the frame, that keep `gap` px apart: each round proposes a position for every
    radius still unplaced and accepts greedily (largest first) those that clash with nothing accepted. -> (k, 3)."""
    acc, todo = np.zeros((0, 3)), np.sort(np.asarray(radii, dtype=float))[::-1]
    todo = todo[2 * todo + 4 < size]
    for _ in range(rounds):
        if not len(todo):
            break
        xy = rng.uniform(todo[:, None] + 2, size - todo[:, None] - 2, (len(todo), 2))
        allc = np.vstack([acc, np.column_stack([xy, todo])])
        na, nc = len(acc), len(todo)
        d = np.hypot(xy[:, None, 0] - allc[None, :, 0], xy[:, None, 1] - allc[None, :, 1])
        clash = d < todo[:, None] + allc[None, :, 2] + gap
        clash[np.arange(nc), na + np.arange(nc)] = False
        keep = np.zeros(na + nc, bool)
        keep[:na] = True
        for i in range(nc):
            if not clash[i, keep].any():
                keep[na + i] = True
        acc, todo = allc[keep], todo[~keep[na:]]
    return acc


def walk(rng, x0, y0, heading, length, step, curl):
    """Polyline of a smooth random walk; heading in radians (screen, y down)."""
    n = max(2, int(length / step))
    th = heading + np.cumsum(rng.normal(0, curl, n))
    x = x0 + np.concatenate([[0], np.cumsum(step * np.cos(th))])
    y = y0 + np.concatenate([[0], np.cumsum(step * np.sin(th))])
    return np.stack([x, y], 1)


def axis_of(polys) -> float | None:
    """Length-weighted dominant axis (degrees 0..180, CCW on screen) of polylines; None when isotropic."""
    d = np.concatenate([np.diff(p, axis=0) for p in polys])
    w = np.hypot(d[:, 0], d[:, 1])
    z = (w * np.exp(2j * np.arctan2(-d[:, 1], d[:, 0]))).sum() / max(w.sum(), 1e-9)
    return round(float(np.degrees(np.angle(z)) / 2) % 180, 1) if abs(z) >= 0.5 else None


def normals(p: np.ndarray) -> np.ndarray:
    d = np.empty_like(p)
    d[1:-1] = p[2:] - p[:-2]
    d[0], d[-1] = p[1] - p[0], p[-1] - p[-2]
    return np.stack([-d[:, 1], d[:, 0]], 1) / (np.hypot(d[:, 0], d[:, 1])[:, None] + 1e-9)


def offset(p: np.ndarray, t: float, nrm: np.ndarray | None = None) -> np.ndarray:
    """Polyline shifted by t px along its normals."""
    return p + t * (normals(p) if nrm is None else nrm)


def in_frame(x, y, size, margin=0) -> bool:
    return margin <= x < size - margin and margin <= y < size - margin


# ------------------------------------------------------------------------------------------------------ renderers
def r_particles(rng, sc: Scene):
    size, s = sc.size, sc.s
    d_mean, cv, cover = rng.uniform(8, 40) * s, rng.uniform(0.05, 0.3), rng.uniform(0.08, 0.45)
    n = int(np.clip(cover * size * size / (math.pi * d_mean ** 2 / 4), 3, 300))
    d = np.maximum(d_mean * rng.lognormal(0, cv, n), 4.0)
    nv = int(rng.choice([5, 6, 8, 32, 32]))  # faceted or round
    aspect = rng.uniform(1.0, 1.2)
    xyr = place(rng, d / 2, size, gap=max(4.0, 0.15 * d_mean))
    himg, dh = canvas(size)
    aimg, da = canvas(size)
    delta = rng.uniform(0.15, 0.5)
    for x, y, r in xyr:
        rel = shape_rel(r, rng, nv, rng.uniform(1.0, aspect))
        for scale, hv in ((1.0, 0.5), (0.7, 0.62), (0.4, 0.7)):  # a low dome in three steps (faint facets)
            dh.polygon(flat(rel * scale + (x, y)), fill=hv)
        da.polygon(flat(rel + (x, y)), fill=delta + rng.normal(0, 0.04))
        sc.sizes_px.append(2 * math.sqrt(poly_area(rel) / math.pi))
    sc.h, sc.a = arr(himg), arr(aimg)
    sc.mask, sc.count = sc.h > 0, len(xyr)


def r_powder(rng, sc: Scene):
    size, s = sc.size, sc.s
    k = int(rng.integers(3, 14))
    radii = np.sort(rng.uniform(25, 90) * s * rng.lognormal(0, 0.3, k))[::-1]
    xyr = place(rng, np.minimum(radii, size * 0.3), size, gap=4)
    himg, dh = canvas(size)
    aimg, da = canvas(size)
    limg, dl = canvas(size, 0, "L")
    for i, (x, y, r) in enumerate(xyr):
        core = shape_pts(x, y, 0.6 * r, rng, 12, rng.uniform(1, 1.3), rough=0.25)  # holds the grains together
        dh.polygon(flat(core), fill=0.5)
        da.polygon(flat(core), fill=0.3)
        dl.polygon(flat(core), fill=i + 1)
        rp = rng.uniform(0.15, 0.28) * r  # grains reach at most 1.3 * 1.25 * rp from their centre: inside r
        m = int(np.clip(1.5 * (r / rp) ** 2, 5, 60))
        reach = min(0.6 * r, r - 1.625 * rp)
        ang, rad = rng.uniform(0, 2 * math.pi, m), reach * np.sqrt(rng.uniform(0, 1, m))
        for j in range(m):
            p = shape_pts(x + rad[j] * math.cos(ang[j]), y + rad[j] * math.sin(ang[j]), rp * rng.uniform(0.5, 1.0),
                          rng, int(rng.integers(4, 8)), rng.uniform(1, 1.3), rough=0.25)
            dh.polygon(flat(p), fill=rng.uniform(0.4, 1.0))
            da.polygon(flat(p), fill=rng.uniform(0.15, 0.5))
            dl.polygon(flat(p), fill=i + 1)
    lab = np.asarray(limg)
    areas = np.bincount(lab.ravel(), minlength=len(xyr) + 1)[1:]
    sc.h, sc.a, sc.mask, sc.count = arr(himg), arr(aimg), lab > 0, len(xyr)
    sc.sizes_px = [2 * math.sqrt(a / math.pi) for a in areas if a > 0]


def ribbon(p: np.ndarray, w: float, nrm: np.ndarray) -> list:
    """Outline of a polyline widened to w px, as one polygon (PIL's curved line joints are slow)."""
    return flat(np.vstack([p + (w / 2) * nrm, (p - (w / 2) * nrm)[::-1]]))


def _wires(rng, sc: Scene, thick: bool):
    size, s = sc.size, sc.s
    if thick:  # fibres: few, wide, straight-ish, overlapping with occlusion and striations
        n, w0, curl, step = int(rng.integers(4, 16)), rng.uniform(10, 36) * s, rng.uniform(0.003, 0.02), 8.0
    else:  # nanowires: many, thin, long, curved
        n, w0, curl, step = int(rng.integers(10, 60)), max(2.0, rng.uniform(2, 6) * s), rng.uniform(0.02, 0.08), 4.0
    aligned, th0 = rng.random() < 0.5, rng.uniform(0, math.pi)
    tipped = not thick and rng.random() < 0.5
    himg, dh = canvas(size)
    aimg, da = canvas(size)
    polys = []
    for _ in range(n):
        w = max(2.0, w0 * rng.lognormal(0, 0.12))
        th = th0 + rng.normal(0, 0.2) if aligned else rng.uniform(0, 2 * math.pi)
        length = rng.uniform(1.0, 2.0) * size if thick else rng.uniform(0.3, 1.2) * size
        x0, y0 = rng.uniform(0, size, 2)
        if thick:  # centre inside the frame, both ends out
            x0, y0 = x0 - math.cos(th) * length / 2, y0 - math.sin(th) * length / 2
        p = walk(rng, x0, y0, th, length, step, curl)
        polys.append(p)
        nrm, alb = normals(p), rng.uniform(0.2, 0.5)
        if thick:
            dh.polygon(ribbon(p, w + 3, nrm), fill=0.05)  # dark gap where fibres overlap
        for frac, hv in ((1.0, 0.5), (0.7, 0.75), (0.4, 0.9), (0.15, 1.0)):  # round cross-section
            if w * frac >= 1:
                dh.polygon(ribbon(p, w * frac, nrm), fill=hv)
        da.polygon(ribbon(p, w, nrm), fill=alb)
        if thick:  # striations along the fibre
            for t in rng.uniform(-0.4, 0.4, int(rng.integers(2, 6))) * w:
                da.line(flat(offset(p, t, nrm)), fill=alb * rng.uniform(0.6, 0.9), width=1)
        if tipped:  # catalyst droplet at the growth end
            ex, ey = p[-1]
            dh.ellipse([ex - 0.8 * w, ey - 0.8 * w, ex + 0.8 * w, ey + 0.8 * w], fill=1.0)
        sc.sizes_px.append(w)
    sc.h, sc.a = arr(himg), arr(aimg)
    sc.mask, sc.count, sc.orientation = sc.h > 0.1, n, axis_of(polys)


def r_nanowires(rng, sc):
    _wires(rng, sc, thick=False)


def r_fibres(rng, sc):
    _wires(rng, sc, thick=True)


def r_patterned(rng, sc: Scene):
    size, s = sc.size, sc.s
    x, y = grid(size)
    p, duty = rng.uniform(12, 40) * s, rng.uniform(0.3, 0.55)
    holes = rng.random() < 0.3
    th = float(rng.choice([0.0, 90.0])) if rng.random() < 0.6 else rng.uniform(0, 180)  # line axis, CCW on screen
    phi = math.radians(th + 90)  # normal of the lines (screen, y up)
    c, sn = math.cos(phi), -math.sin(phi)
    u, v = x * c + y * sn, y * c - x * sn  # across, along
    off_u, ramp, ler = rng.uniform(0, p), 1.2 * s + 0.5, rng.uniform(0, 1.2) * s
    ku = np.floor((u - off_u) / p + 0.5).astype(np.int32)
    du = u - off_u - ku * p
    ku0 = int(ku.min())
    nk = int(ku.max()) - ku0 + 1
    w = duty * p
    widths = w * (1 + rng.normal(0, 0.03, nk + 2))
    if holes:
        off_v = rng.uniform(0, p)
        kv = np.floor((v - off_v) / p + 0.5).astype(np.int32)
        dv = v - off_v - kv * p
        kv0 = int(kv.min())
        nkv = int(kv.max()) - kv0 + 1
        rad = w / 2 * (1 + rng.normal(0, 0.04, (nk, nkv)) + rng.uniform(0, ler / max(w, 1)))
        cell = (ku - ku0) * nkv + (kv - kv0)
        hole = np.clip((rad.ravel()[cell] - np.hypot(du, dv)) / ramp + 0.5, 0, 1)
        sc.h, sc.mask = 1.0 - hole, hole > 0.5
        seen = np.bincount(cell[sc.mask], minlength=nk * nkv) > 0
        sc.orientation, sc.sizes_px, sc.count = None, list(2 * rad.ravel()[seen]), int(seen.sum())
        sc.defect_kinds = ("contamination_particle", "missing_feature")
        sc.hooks["missing_feature"] = lambda r: _missing_hole(r, sc, cell, rad.shape, (ku0, kv0), (off_u, off_v), p,
                                                              (c, sn))
    else:
        vmin = float(v.min())
        nv_ = int((float(v.max()) - vmin) / (8 * s + 4)) + 2
        nl = rng.standard_normal((2, nk, nv_)).astype(F32) * ler
        vb = np.clip(((v - vmin) / (8 * s + 4)).astype(np.int32), 0, nv_ - 1)
        k = ku - ku0
        half = widths[k] / 2
        left, right = du + half + nl[0][k, vb], half + nl[1][k, vb] - du
        sc.h = np.clip(np.minimum(left, right) / ramp + 0.5, 0, 1).astype(F32)
        sc.mask = sc.h > 0.5
        seen = np.bincount(k[sc.mask], minlength=nk) > 0
        sc.count, sc.orientation, sc.sizes_px = int(seen.sum()), round(th % 180, 1), list(widths[:nk][seen])
        sc.defect_kinds = ("contamination_particle", "line_bridging", "missing_feature")
        for kind in ("line_bridging", "missing_feature"):
            sc.hooks[kind] = (lambda kind_: lambda r: _line_defect(r, sc, kind_, p, w, off_u, c, sn))(kind)
    sc.h = sc.h.astype(F32)
    sc.a = (0.3 * sc.h).astype(F32)
    sc.pitch_px, sc.line_width_px = p, float(np.mean(sc.sizes_px))


def _uv_to_xy(uu, vv, c, sn):
    """Inverse of u = x c + y sn, v = y c - x sn."""
    return uu * c - vv * sn, uu * sn + vv * c


def _line_defect(rng, sc: Scene, kind, p, w, off_u, c, sn):
    size = sc.size
    for _ in range(20):
        cx, cy = rng.uniform(0.15 * size, 0.85 * size, 2)
        u0, v0 = cx * c + cy * sn, cy * c - cx * sn
        kc = math.floor((u0 - off_u) / p + 0.5)
        uc = off_u + kc * p
        if kind == "line_bridging":  # a bridge across the space to the next line
            us, ue, hv = uc + w / 2 - 1, uc + p - w / 2 + 1, 1.0
            vs, ve = v0 - 0.4 * w - 1, v0 + 0.4 * w + 1
        else:  # a missing stretch of line
            us, ue, hv = uc - w / 2 - 2, uc + w / 2 + 2, 0.0
            vs, ve = v0 - 1.5 * p, v0 + 1.5 * p
        q = [_uv_to_xy(a, b, c, sn) for a, b in ((us, vs), (ue, vs), (ue, ve), (us, ve))]
        mx, my = _uv_to_xy((us + ue) / 2, (vs + ve) / 2, c, sn)
        if in_frame(mx, my, size, 4):
            img, d = canvas(size)
            d.polygon(flat(q), fill=1.0)
            m = arr(img) > 0
            sc.h[m] = hv
            sc.a[m] = 0.3 * hv
            sc.mask = sc.h > 0.5
            return {"type": kind, "x_px": int(mx), "y_px": int(my)}
    return None


def _missing_hole(rng, sc: Scene, cell, shape, k0, off, p, rot):
    """One contact hole of the lattice left unopened."""
    for _ in range(20):
        i, j = int(rng.integers(shape[0])), int(rng.integers(shape[1]))
        mx, my = _uv_to_xy(off[0] + (i + k0[0]) * p, off[1] + (j + k0[1]) * p, *rot)
        if in_frame(mx, my, sc.size, p / 2 + 2):
            sel = cell == i * shape[1] + j
            sc.h[sel] = 1.0
            sc.a[sel] = 0.3
            sc.mask = sc.h < 0.5
            sc.count -= 1
            return {"type": "missing_feature", "x_px": int(mx), "y_px": int(my)}
    return None


def r_porous(rng, sc: Scene):
    size, s = sc.size, sc.s
    corr = rng.uniform(8, 32) * s
    f = smooth_field(rng, size, corr)
    if rng.random() < 0.4:  # hierarchical pores
        f += 0.35 * smooth_field(rng, size, corr / 3)
    por = rng.uniform(0.25, 0.6)
    q = float(np.partition(f.ravel(), int(por * f.size))[int(por * f.size)])
    mask = f < q
    lab, n = ndi.label(mask)
    areas = np.bincount(lab.ravel())
    keep = areas >= max(6.0, 0.05 * corr * corr)
    keep[0] = False
    small = mask & ~keep[lab]
    f[small] = q + 0.02  # pores too small to see are filled: the truth counts only what is drawn
    mask &= ~small
    kept = areas[1:][keep[1:]]
    sc.h = np.clip(0.55 + (f - q) * 1.5, 0, 1).astype(F32)
    sc.a = (0.35 * sc.h).astype(F32)
    sc.mask, sc.count = mask, int(len(kept))
    sc.sizes_px = list(2 * np.sqrt(kept / math.pi))
    sc.porosity = float(mask.mean())


def r_films(rng, sc: Scene):
    size, s = sc.size, sc.s
    x, y = grid(size)
    g = rng.uniform(14, 60) * s
    nc = int(math.ceil(size / g))
    gi, gj = np.meshgrid(np.arange(nc), np.arange(nc))
    sx = np.clip((gi.ravel() + 0.5 + rng.uniform(-0.45, 0.45, nc * nc)) * g, 0, size - 1)
    sy = np.clip((gj.ravel() + 0.5 + rng.uniform(-0.45, 0.45, nc * nc)) * g, 0, size - 1)
    marker = np.zeros((size, size), np.int32)
    marker[sy.astype(int), sx.astype(int)] = np.arange(1, nc * nc + 1)
    iy, ix = ndi.distance_transform_edt(marker == 0, return_distances=False, return_indices=True)
    lab = marker[iy, ix]
    b = np.zeros((size, size), F32)
    b[:, 1:] += lab[:, 1:] != lab[:, :-1]
    b[1:, :] += lab[1:, :] != lab[:-1, :]
    groove = ndi.gaussian_filter(np.minimum(b, 1), 0.8 * s + 0.3)
    tx, ty = rng.normal(0, 0.25 / g, (2, nc * nc + 1)).astype(F32)
    sxx, syy = np.concatenate([[0], sx]).astype(F32), np.concatenate([[0], sy]).astype(F32)
    tilt = tx[lab] * (x - sxx[lab]) + ty[lab] * (y - syy[lab])
    sc.h = (0.75 + tilt - 2.0 * groove).astype(F32)
    sc.a = (0.3 + rng.uniform(0.05, 0.15) * rng.standard_normal(nc * nc + 1).astype(F32)[lab]).astype(F32)
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas > 0]
    sc.count, sc.sizes_px = int(len(areas)), list(2 * np.sqrt(areas / math.pi))
    sc.mask = np.ones((size, size), bool)
    sc.porosity = 0.0
    if rng.random() < 0.25:  # pinholes: a porous film
        img, d = canvas(size)
        for px, py in rng.uniform(0, size, (int(rng.integers(10, 120)), 2)):
            r = rng.uniform(1.5, 4) * s + 0.5
            d.ellipse([px - r, py - r, px + r, py + r], fill=1.0)
        pin = arr(img) > 0
        sc.h[pin], sc.mask = 0.0, ~pin
        sc.porosity = float(pin.mean())
    sc.defect_kinds = ("contamination_particle", "crack")
    sc.hooks["crack"] = lambda r: _crack(r, sc)


def _crack(rng, sc: Scene):
    size, s = sc.size, sc.s
    x0, y0 = rng.uniform(0.2 * size, 0.8 * size, 2)
    p = walk(rng, x0, y0, rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 0.7) * size, 3.0, 0.12)
    p += rng.normal(0, 0.8, p.shape)  # jagged edges
    img, d = canvas(size)
    d.line(flat(p), fill=1.0, width=max(2, int(rng.uniform(2, 4.5) * s + 0.5)))
    m = arr(img) > 0
    sc.h[m] = -0.3
    sc.a[m] = float(sc.a.min()) - 0.3  # a deep gap: few electrons escape it
    sc.mask = sc.mask & ~m
    seen = [q for q in p if in_frame(q[0], q[1], size)] or [(x0, y0)]  # the middle of its visible part
    mx, my = seen[len(seen) // 2]
    return {"type": "crack", "x_px": int(mx), "y_px": int(my)}


def r_mems(rng, sc: Scene):
    size, s = sc.size, sc.s
    rot = math.radians(float(rng.choice([0.0, 90.0])) + rng.normal(0, 1.5))
    ox, oy = size / 2 + rng.uniform(-0.15, 0.15, 2) * size
    cr, sr = math.cos(rot), math.sin(rot)
    himg, dh = canvas(size)
    rects = []  # (u0, v0, u1, v1, height, kind) in the layout frame; kind: line | pad | body | step (not counted)

    def to_xy(u, v):
        return ox + u * cr - v * sr, oy + u * sr + v * cr

    layout = rng.choice(["comb", "pads", "spring"])
    fw = rng.uniform(6, 18) * s
    axis = None
    if layout == "comb":
        lf = rng.uniform(0.3, 0.5) * size
        ov, bt, pitch = rng.uniform(0.3, 0.7) * lf, rng.uniform(2, 5) * fw, 2 * (fw + rng.uniform(0.6, 1.5) * fw)
        half = size
        rects += [(-half, ov / 2 - lf - bt, half, ov / 2 - lf, 1.0, "body"),
                  (-half, lf - ov / 2, half, lf - ov / 2 + bt, 1.0, "body")]
        fingers = [(uu, ov / 2 - lf, uu + fw, ov / 2) for uu in np.arange(-half, half, pitch)]
        fingers += [(uu + pitch / 2, -ov / 2, uu + pitch / 2 + fw, lf - ov / 2) for uu in np.arange(-half, half, pitch)]
        sc.hooks["missing_feature"] = lambda r: _missing_finger(r, sc, fingers, to_xy)
        sc.defect_kinds = ("contamination_particle", "missing_feature")
        rects += [(*f, 0.9, "line") for f in fingers]
        axis = 90 - math.degrees(rot)  # fingers run along v; screen angles turn the other way (y down)
    elif layout == "pads":
        for x, y, r in place(rng, rng.uniform(0.1, 0.2, int(rng.integers(2, 6))) * size, size, gap=3 * fw):
            u, v = (x - ox) * cr + (y - oy) * sr, (y - oy) * cr - (x - ox) * sr
            rects.append((u - r * 0.7, v - r * 0.7, u + r * 0.7, v + r * 0.7, 0.8, "pad"))
            rects.append((u - r * 0.5, v - r * 0.5, u + r * 0.5, v + r * 0.5, 1.0, "step"))  # passivation opening
            end = rng.choice([-1, 1]) * size
            rects.append((min(u, end), v - fw / 2, max(u, end), v + fw / 2, 0.8, "line") if rng.random() < 0.5
                         else (u - fw / 2, min(v, end), u + fw / 2, max(v, end), 0.8, "line"))
    else:  # serpentine spring beside a perforated proof mass
        pitch, amp = rng.uniform(3, 6) * fw, rng.uniform(0.2, 0.4) * size
        for i, uu in enumerate(np.arange(-size, 0, pitch)):
            rects.append((uu, -amp, uu + fw, amp, 1.0, "line"))
            vv = amp if i % 2 else -amp - fw
            rects.append((uu, vv, uu + pitch + fw, vv + fw, 1.0, "line"))
        rects.append((0, -size, size, size, 0.9, "body"))
        axis = 90 - math.degrees(rot)
    for u0, v0, u1, v1, hv, _ in rects:
        dh.polygon(flat([to_xy(u0, v0), to_xy(u1, v0), to_xy(u1, v1), to_xy(u0, v1)]), fill=hv)
    if layout == "spring":  # release holes in the mass
        hs, hp = max(3.0, rng.uniform(3, 7) * s), rng.uniform(2.5, 4) * max(3.0, rng.uniform(3, 7) * s)
        for uu in np.arange(hp, size, hp):
            for vv in np.arange(-size, size, hp):
                q = [to_xy(uu, vv), to_xy(uu + hs, vv), to_xy(uu + hs, vv + hs), to_xy(uu, vv + hs)]
                dh.polygon(flat(q), fill=0.0)
    sc.h = arr(himg)
    sc.a = (0.3 * sc.h).astype(F32)
    sc.mask = sc.h > 0.5
    visible = [r for r in rects if r[5] != "step" and _rect_visible(r, to_xy, size)]
    sc.count = len(visible)  # fingers, beams, traces, pads, backbones and masses in view
    sc.sizes_px = [min(abs(r[2] - r[0]), abs(r[3] - r[1])) for r in visible if r[5] == "line"] or [fw]
    sc.orientation = round(axis % 180, 1) if axis is not None else None


def _rect_visible(r, to_xy, size) -> bool:
    pts = np.array([to_xy(r[0], r[1]), to_xy(r[2], r[1]), to_xy(r[2], r[3]), to_xy(r[0], r[3])])
    return pts[:, 0].max() > 0 and pts[:, 0].min() < size and pts[:, 1].max() > 0 and pts[:, 1].min() < size


def _missing_finger(rng, sc: Scene, fingers, to_xy):
    order = rng.permutation(len(fingers))
    for i in order:
        u0, v0, u1, v1 = fingers[i]
        mx, my = to_xy((u0 + u1) / 2, (v0 + v1) / 2)
        if in_frame(mx, my, sc.size, 8):
            img, d = canvas(sc.size)
            d.polygon(flat([to_xy(u0 - 1, v0), to_xy(u1 + 1, v0), to_xy(u1 + 1, v1), to_xy(u0 - 1, v1)]), fill=1.0)
            m = arr(img) > 0
            sc.h[m], sc.a[m] = 0.0, 0.0
            sc.mask = sc.h > 0.5
            sc.count -= 1
            return {"type": "missing_feature", "x_px": int(mx), "y_px": int(my)}
    return None


def r_tips(rng, sc: Scene):
    size, s = sc.size, sc.s
    n = int(rng.choice([1, 1, 2, 2, 3, 4, 5, 6]))
    ax = rng.uniform(0, 2 * math.pi)
    length, gamma = rng.uniform(0.35, 0.8) * size, rng.uniform(0.6, 1.4)
    wb = rng.uniform(0.15, 0.35) * length * (1.0 if n < 4 else 0.6)
    ux, uy, px, py = math.cos(ax), math.sin(ax), -math.sin(ax), math.cos(ax)
    bx, by = size / 2 - ux * length * rng.uniform(0.35, 0.6), size / 2 - uy * length * rng.uniform(0.35, 0.6)
    spacing = rng.uniform(1.2, 2.0) * wb
    himg, dh = canvas(size)
    if rng.random() < 0.6:  # substrate the tips stand on
        far = 2 * size
        dh.polygon(flat([(bx + px * far, by + py * far), (bx - px * far, by - py * far),
                         (bx - px * far - ux * far, by - py * far - uy * far),
                         (bx + px * far - ux * far, by + py * far - uy * far)]), fill=0.3)
    mimg, dm = canvas(size)
    t = np.linspace(0, 1, 16)
    for i in range(n):
        w = wb * rng.uniform(0.85, 1.15)
        cx, cy = bx + px * (i - (n - 1) / 2) * spacing, by + py * (i - (n - 1) / 2) * spacing
        ln = length * rng.uniform(0.85, 1.1)
        half = w / 2 * (1 - t) ** gamma + rng.uniform(1, 3) * s * t
        axis = np.stack([cx + ux * ln * t, cy + uy * ln * t], 1)
        across = np.stack([px * half, py * half], 1)
        for frac, hv in ((1.0, 0.55), (0.65, 0.8), (0.3, 1.0)):  # rounded cross-section in three steps
            outline = flat(np.vstack([axis + frac * across, (axis - frac * across)[::-1]]))
            dh.polygon(outline, fill=hv)
            if frac == 1.0:
                dm.polygon(outline, fill=1.0)
        sc.sizes_px.append(w)
    sc.h = arr(himg)
    sc.a = (0.3 * sc.h).astype(F32)
    sc.mask, sc.count = arr(mimg) > 0, n
    sc.orientation = round(math.degrees(math.atan2(-uy, ux)) % 180, 1)


def r_biological(rng, sc: Scene):
    """Cells (irregular, ruffled outlines, bright membrane, nucleus, bumpy surface, filopodia) or rod bacteria,
    alone or touching in clusters, sometimes on a mesh of extracellular fibrils."""
    size, s = sc.size, sc.s
    d_mean, cover = rng.uniform(28, 110) * s, rng.uniform(0.15, 0.5)
    rods = rng.random() < 0.3
    n = int(np.clip(cover * size * size / (math.pi * d_mean ** 2 / 4) / (2.0 if rods else 1.0), 2, 60))
    d = d_mean * rng.lognormal(0, 0.2, n)
    himg, dh = canvas(size)
    aimg, da = canvas(size)
    mimg, dm = canvas(size)
    if rng.random() < 0.5:  # extracellular fibrils
        for _ in range(int(rng.integers(5, 25))):
            p = walk(rng, *rng.uniform(0, size, 2), rng.uniform(0, 2 * math.pi), rng.uniform(0.2, 0.8) * size, 4, 0.15)
            da.line(flat(p), fill=0.15, width=1)
            dh.line(flat(p), fill=0.15, width=1)
    stretch = 1.6 if rods else 1.0
    xyr = place(rng, d / 2 * stretch, size, gap=3 if rng.random() < 0.5 else -0.15 * d_mean)
    axes, tt = [], np.linspace(0, 2 * math.pi, 48, endpoint=False)
    for x, y, rr in xyr:
        r = rr / stretch
        if rods:
            rot, half_len, wr = rng.uniform(0, math.pi), r * 1.6, r * 0.45
            t1, t2 = np.linspace(-math.pi / 2, math.pi / 2, 12), np.linspace(math.pi / 2, 3 * math.pi / 2, 12)
            loc = np.concatenate([np.stack([half_len - wr + wr * np.cos(t1), wr * np.sin(t1)], 1),
                                  np.stack([-half_len + wr + wr * np.cos(t2), wr * np.sin(t2)], 1)])
            c, sn = math.cos(rot), math.sin(rot)
            pts = np.stack([x + c * loc[:, 0] - sn * loc[:, 1], y + sn * loc[:, 0] + c * loc[:, 1]], 1)
            axes.append(np.array([[0.0, 0.0], [c, sn]]))
        else:
            amp = rng.uniform(0.03, 0.2, 7) / np.arange(2, 9) ** 0.75
            rad = r * (1 + (amp[:, None] * np.cos(np.arange(2, 9)[:, None] * tt + rng.uniform(0, 6.3, (7, 1)))).sum(0)
                       + rng.normal(0, 0.015, tt.size))
            pts = np.stack([x + rad * np.cos(tt), y + rad * np.sin(tt)], 1)
            for k in rng.choice(tt.size, int(rng.integers(0, 8)), replace=False):  # filopodia
                ang, ln = tt[k] + rng.normal(0, 0.3), r * rng.uniform(0.15, 0.5)
                x0, y0 = pts[k]
                dh.line([x0, y0, x0 + ln * math.cos(ang), y0 + ln * math.sin(ang)], fill=0.4, width=max(1, int(2 * s)))
        cen = pts.mean(0)
        for scale, hv in ((1.0, 0.5), (0.8, 0.8), (0.5, 1.0)):
            dh.polygon(flat(cen + (pts - cen) * scale), fill=hv)
        dm.polygon(flat(pts), fill=1.0)
        body = rng.uniform(0.1, 0.3)
        da.polygon(flat(pts), fill=body)
        da.line(flat(np.vstack([pts, pts[:1]])), fill=body + rng.uniform(0.2, 0.4), width=max(2, int(0.07 * r)))
        if not rods and rng.random() < 0.7:  # nucleus
            nuc = cen + (pts - cen) * rng.uniform(0.3, 0.45) + rng.normal(0, 0.1 * r, 2)
            da.polygon(flat(nuc), fill=body + rng.choice([-0.1, 0.15]))
        sc.sizes_px.append(2 * math.sqrt(poly_area(pts) / math.pi))
    sc.h, sc.a, sc.mask = arr(himg), arr(aimg), arr(mimg) > 0
    bumps = smooth_field(rng, size, rng.uniform(2.5, 8) * s + 1) * sc.mask  # bumpy membrane, granular cytoplasm
    sc.h += rng.uniform(0.1, 0.3) * bumps
    sc.a += 0.08 * bumps
    sc.count = len(xyr)
    sc.orientation = axis_of(axes) if rods and len(axes) > 1 else None


RENDERERS = {"biological": r_biological, "fibres": r_fibres, "films_coated_surface": r_films,
             "mems_devices_electrodes": r_mems, "nanowires": r_nanowires, "particles": r_particles,
             "patterned_surface": r_patterned, "porous_sponge": r_porous, "powder": r_powder, "tips": r_tips}
assert set(RENDERERS) == set(CATEGORIES)


def contamination(rng, sc: Scene):
    size, s = sc.size, sc.s
    r = rng.uniform(3, 8) * s + 1
    x, y = rng.uniform(r + 2, size - r - 2, 2)
    img, d = canvas(size)
    d.polygon(flat(shape_pts(x, y, r, rng, 9, rng.uniform(1, 1.5), rough=0.3)), fill=1.0)
    m = arr(img) > 0
    sc.h[m] = np.maximum(sc.h[m], 0) + 0.8
    sc.a[m] = 0.7
    return {"type": "contamination_particle", "x_px": int(x), "y_px": int(y)}
