"""Procedural SEM/TEM micrographs with the ground truth they were drawn from (docs/manifest.md).

`render(category, rng, size, modality, ...)` draws one scene for a category of semivlm.data.CATEGORIES, passes it
through one image-formation model shared by all categories, and returns (uint8 image, ground_truth, instrument,
provenance). Categories differ only in morphology: pixel size, brightness, contrast, noise, charging, defocus and
edge brightening come from the same distributions for every category, and the image is normalised to its drawn
brightness (mean) and contrast (standard deviation) so that first-order statistics carry no category.

Conventions: coordinates are image pixels, x right, y down, origin top-left; `orientation_deg` is the axis of
elongated features in 0..180, counter-clockwise from +x as seen on screen (null when no axis dominates);
sizes are equivalent-circle diameters (particles, agglomerates, cells, pores, grains) or widths (wires, fibres,
lines, fingers, tip bases). Lengths in pixels scale with sqrt(size / 512), so a small render looks like a
zoomed-out large one. A data bar, when drawn, is appended below the micrograph (height grows by its height).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from data_prep.morphology import DEFECT_TYPES, F32, RENDERERS, Scene, contamination, flat, gauss_noise, smooth_field
from semivlm.data import fmt_length


# ------------------------------------------------------------------------------------------------ image formation
def draw_imaging(rng) -> dict:
    """Imaging conditions, drawn from one distribution for every category (modality only switches edge brightening)."""
    return {"noise_sigma": rng.uniform(0.02, 0.12), "charging": rng.uniform(0.1, 1.0) if rng.random() < 0.35 else 0.0,
            "edge_brightening": rng.uniform(0.2, 1.0), "defocus_px": max(0.0, rng.uniform(-0.4, 2.0)),
            "brightness": rng.uniform(0.3, 0.65), "contrast": rng.uniform(0.5, 1.1),
            "shading": rng.uniform(-0.3, 0.3), "shade_dir": rng.uniform(0, 2 * math.pi), "tex": rng.uniform(0.0, 0.05),
            "tex_corr": rng.uniform(10, 80), "mu": rng.uniform(0.8, 2.5), "height_gain": rng.uniform(0.0, 0.4)}


def form_image(sc: Scene, rng, modality: str, im: dict) -> np.ndarray:
    """Scene -> 8-bit micrograph: SEM = albedo + edge brightening + topographic shading; TEM = mass-thickness
    absorption (dark objects, no edge brightening); then charging, defocus, normalisation to the drawn
    brightness/contrast, and noise."""
    size, s = sc.size, sc.s
    h = sc.h
    tex = im["tex"] * smooth_field(rng, size, im["tex_corr"] * s)
    if modality == "SEM":
        hs = ndi.gaussian_filter(h, 0.8 * s + 0.2, truncate=3.0)
        gx, gy = np.zeros_like(hs), np.zeros_like(hs)
        np.subtract(hs[:, 1:], hs[:, :-1], out=gx[:, 1:])
        np.subtract(hs[1:, :], hs[:-1, :], out=gy[1:, :])
        edge = gx * gx
        edge += gy * gy
        np.sqrt(edge, out=edge)
        edge *= 3.0
        np.minimum(edge, 1.0, out=edge)
        edge *= im["edge_brightening"]
        gx *= im["shading"] * math.cos(im["shade_dir"])
        gy *= im["shading"] * math.sin(im["shade_dir"])
        edge += gx
        edge += gy
        edge *= np.clip(h * 10.0, 0.0, 1.0)  # edge and shading effects sit on the objects, not on the substrate
        sig = sc.a + tex
        sig += im["height_gain"] * h
        sig += edge
    else:
        sig = np.exp(-im["mu"] * (np.maximum(h, 0) + 0.5 * sc.a + tex))
    if im["charging"] > 0:
        glow = np.maximum(smooth_field(rng, size, size / 3), 0)
        rows = np.repeat(smooth_field(rng, size, 6 * s)[:, :1], size, 1)
        sub = sig[::4, ::4]
        sig = sig + im["charging"] * float(sub.std() + 1e-3) * (1.5 * glow + 0.5 * rows * (sig > sub.mean()))
    if im["defocus_px"] > 0:
        sig = ndi.gaussian_filter(sig, im["defocus_px"], truncate=3.0)
    sub = sig[::4, ::4]  # statistics on a subsample: same result within 1%, a quarter of the time
    out = sig - sub.mean()
    out *= 0.2 * im["contrast"] / (sub.std() + 1e-6)
    out += im["brightness"]
    if im["noise_sigma"] > 0:
        out += im["noise_sigma"] * gauss_noise(rng, (size, size))
        out += 0.3 * im["noise_sigma"] * gauss_noise(rng, (size, 1))  # scan-line noise
    return _display_lut()[np.clip((out + 1.0) * 1024.0, 0, 4095).astype(np.uint16)]


@lru_cache(maxsize=1)
def _display_lut() -> np.ndarray:
    """Signal in [-1, 3) at 4096 levels -> 8 bit: linear around mid-grey, softly saturating (tanh) towards 0 and
    255 so that very bright or dark objects keep their inner detail instead of clipping flat."""
    v = np.arange(4096) / 1024.0 - 1.0
    return np.clip(np.round(255 * (0.5 + 0.49 * np.tanh((v - 0.5) / 0.49))), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------------------- data bar
NICE = [m * 10 ** e for e in range(-1, 7) for m in (1, 2, 5)]



def instrument_for(rng, modality: str, size: int, pixel_nm: float) -> dict:
    mag = 127e6 / (size * pixel_nm)  # on a 127 mm wide print, as SEM vendors quote it
    if modality == "SEM":
        return {"voltage_kv": float(rng.choice([1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0])),
                "working_distance_mm": round(float(rng.uniform(2, 12)), 1),
                "detector": str(rng.choice(["ETD", "TLD", "InLens", "SE2"])), "magnification": int(round(mag, -1))}
    return {"voltage_kv": float(rng.choice([80.0, 120.0, 200.0, 300.0])), "working_distance_mm": None,
            "detector": "BF", "magnification": int(round(mag, -1))}


def add_data_bar(img: np.ndarray, pixel_nm: float, inst: dict) -> tuple[np.ndarray, dict]:
    """Append an instrument data bar below the micrograph: HV/WD/magnification/detector text (PIL's default bitmap
    font) and a scale bar exactly round(L_nm / pixel_nm) px long under its label."""
    size = img.shape[1]
    bh = max(24, round(0.09 * size))
    bar = Image.new("L", (size, bh), 0)
    d, font = ImageDraw.Draw(bar), ImageFont.load_default_imagefont()
    top = (bh - 24) // 2
    fits = [L for L in NICE if L / pixel_nm <= 0.3 * size]
    L = fits[-1] if fits else NICE[0]
    px = max(1, int(round(L / pixel_nm)))
    label = fmt_length(L)
    lw = int(d.textlength(label, font=font))
    x1 = size - 4
    x0 = x1 - max(px, lw)
    bx0 = x0 + (max(px, lw) - px) // 2
    d.text((x0 + (max(px, lw) - lw) // 2, top + 2), label, fill=255, font=font)
    d.rectangle([bx0, top + 16, bx0 + px - 1, top + 18], fill=255)
    lines = [f"HV {inst['voltage_kv']:g} kV" + (f"  WD {inst['working_distance_mm']:g} mm"
                                                 if inst["working_distance_mm"] is not None else ""),
             f"mag {inst['magnification']:,} x  {inst['detector']}".replace(",", " ")]
    for i, text in enumerate(lines):
        while text and d.textlength(text, font=font) > x0 - 10:
            text = text[:-1]
        d.text((4, top + 2 + 11 * i), text, fill=255, font=font)
    box = [int(bx0), int(size + top + 16), int(bx0 + px), int(size + top + 19)]
    return np.vstack([img, np.asarray(bar)]), {"data_bar_box": [0, size, size, size + bh],
                                               "scale_bar": {"nm": float(L), "px": px, "label": label, "box": box}}


# ------------------------------------------------------------------------------------------------------------ render
def render(category: str, rng, size: int = 512, modality: str = "SEM", data_bar: bool = False,
           defect_rate: float = 0.2, clean: bool = False):
    """One micrograph. -> (uint8 array HxW, ground_truth dict, instrument dict, provenance dict).
    clean=True keeps the geometry and contrast of the same seed but applies no noise, charging or defocus and no
    data bar: what tests measure the ground truth against."""
    if category not in RENDERERS:
        raise ValueError(f"unknown category '{category}'; choose from {sorted(RENDERERS)}")
    pixel_nm = float(f"{math.exp(rng.uniform(math.log(0.5), math.log(50.0))):.4g}")  # same for every category
    im = draw_imaging(rng)
    if modality == "TEM":
        im["edge_brightening"] = 0.0
    if clean:
        im.update(noise_sigma=0.0, charging=0.0, defocus_px=0.0)
        data_bar = False
    inst = instrument_for(rng, modality, size, pixel_nm)
    sc = Scene(size=size, s=math.sqrt(size / 512))
    RENDERERS[category](rng, sc)
    if rng.random() < defect_rate:
        for _ in range(int(rng.integers(1, 3))):
            kind = str(rng.choice(list(sc.defect_kinds)))
            d = contamination(rng, sc) if kind == "contamination_particle" else sc.hooks[kind](rng)
            if d is not None:
                sc.defects.append(d)
    img = form_image(sc, rng, modality, im)
    prov = {"data_bar_box": None, "scale_bar": None}
    if data_bar:
        img, prov = add_data_bar(img, pixel_nm, inst)
    sizes = np.asarray(sc.sizes_px, dtype=float) * pixel_nm
    gt = {"category": category, "object_count": int(sc.count),
          "size_mean_nm": round(float(sizes.mean()), 2) if len(sizes) else None,
          "size_std_nm": round(float(sizes.std()), 2) if len(sizes) else None,
          "orientation_deg": sc.orientation,
          "coverage": round(float(sc.mask.mean()), 4),
          "porosity": round(sc.porosity, 4) if sc.porosity is not None else None,
          "pitch_nm": round(sc.pitch_px * pixel_nm, 3) if sc.pitch_px else None,
          "line_width_nm": round(sc.line_width_px * pixel_nm, 3) if sc.line_width_px else None,
          "defects": sc.defects,
          "imaging": {"noise_sigma": round(im["noise_sigma"], 4), "charging": round(im["charging"], 4),
                      "edge_brightening": round(im["edge_brightening"], 4), "defocus_px": round(im["defocus_px"], 3),
                      "brightness": round(im["brightness"], 4), "contrast": round(im["contrast"], 4),
                      "data_bar": bool(data_bar)}}
    return img, gt, inst, {"pixel_size_nm": pixel_nm, **prov}
