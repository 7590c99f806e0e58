"""Ingest real microscope files -> normalised 8-bit grayscale PNGs + a micrograph manifest (docs/manifest.md).

    python data_prep/ingest.py --inputs ~/.cache/semivlm-test-data --out runs/debug/ingest     # the tests' examples
    python data_prep/ingest.py --inputs /data/sem --out runs/mydata/ingest --frames all --max_side 2048 --tile 1024
    srun -N1 -c 4 --mem=48G python data_prep/ingest.py --inputs /data/sem_files.txt --out $SCRATCH/ingest --seed 1

Reads DM3/DM4, EMD, HyperSpy/atomap HDF5, FEI/Zeiss/ImageJ/plain TIFF, PNG/JPEG (DPI tags are not pixel sizes); crops
the data bar, maps >8-bit data to 8 bits by a percentile window, tiles large images, keeps near-duplicates (and all
images of one file) in one split; every file gets `ok` or `skip <reason>`. Writes images/, manifest.jsonl, stats.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path
from typing import Literal

import numpy as np

from semivlm.config import ConfigError, load_config, save_config
from semivlm.data import read_jsonl, write_jsonl_atomic

EXTS = {".dm3": "dm", ".dm4": "dm", ".emd": "emd", ".tif": "tiff", ".tiff": "tiff", ".png": "pil", ".jpg": "pil",
        ".jpeg": "pil", ".bmp": "pil", ".gif": "pil", ".hspy": "hdf5", ".hdf5": "hdf5", ".h5": "hdf5"}
TO_NM = {"m": 1e9, "mm": 1e6, "µm": 1e3, "μm": 1e3, "um": 1e3, "micron": 1e3, "microns": 1e3, "nm": 1.0,
         "pm": 1e-3, "å": 0.1, "Å": 0.1, "a": 0.1, "angstrom": 0.1}
SI = {**{u: f * 1e-9 for u, f in TO_NM.items()}, "kV": 1e3, "V": 1.0}
# normalised instrument fields: key=path in the vendor's metadata[*factor to the key's unit]; the first found wins
INSTRUMENT = {   # DM: in ImageTags/Microscope Info
    "dm": "model=Name|voltage_kv=Voltage*1e-3|mode=Illumination Mode|magnification=Indicated Magnification*1",
    "emd": "manufacturer=Instrument/Manufacturer|model=Instrument/InstrumentClass|detector=BinaryResult/Detector"
           "|voltage_kv=Optics/AccelerationVoltage*1e-3|dwell_time_us=Scan/DwellTime*1e6",
    "fei": "model=System/SystemType|voltage_kv=Beam/HV*1e-3|voltage_kv=EBeam/HV*1e-3|detector=Detectors/Name|detector_mode="
           "Detectors/Mode|working_distance_mm=Stage/WorkingDistance*1e3|working_distance_mm=EBeam/WD*1e3|dwell_time_us="
           "Scan/Dwelltime*1e6|field_of_view_um=Scan/HorFieldsize*1e6",
    "zeiss": "voltage_kv=ap_actualkv*1e-3|working_distance_mm=ap_wd*1e3|magnification=ap_mag|detector=dp_detector_channel"}
SIGNAL = {"pixel_size_nm": None, "instrument": {}, "modality": None, "prov": {}, "colour": None, "bar_rows": 0}  # +stack
log = partial(print, "[ingest]", flush=True)
DCT = np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * np.arange(32)[:, None] / 64)   # DCT-II basis, 32x32 pHash


@dataclass
class IngestConfig:
    out: str = ""                                           # output directory (required)
    inputs: list[str] | str = field(default_factory=list)   # folders (recursed), files, .txt/.jsonl ("path") lists
    max_side: int = 2048                 # a longer side than this -> tiles
    tile: int = 1024                     # tile side (px); edge tiles are aligned to the border
    tile_overlap: int = 0                # px shared by neighbouring tiles
    min_side: int = 64                   # shorter (after the data-bar crop) -> skip too_small
    max_pixels: int = 500_000_000        # more pixels in one frame -> skip too_large, before decoding
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # >8-bit data: window mapped to 0..255
    crop_data_bar: bool = True
    dedup_threshold: int = 8             # near duplicate: pHash Hamming distance <= this (of 64 bits); -1: exact only
    keep_duplicates: bool = False        # keep every duplicate (same dup_group, same split) instead of one per cluster
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    frames: Literal["first", "all"] = "first"               # stacks and multi-page files
    default_modality: Literal["SEM", "TEM"] = "SEM"         # when the file does not tell


class Skip(Exception):
    """Skip(reason, detail): a file or frame that is not ingested; counted by reason, printed with the detail."""


def _py(x):                             # metadata -> JSON-safe: numpy scalars -> numbers, anything else -> its str
    return json.loads(json.dumps(x, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def dig(d, path: str):                  # d["a"]["b"] for "a/b", None where it is missing
    return reduce(lambda x, k: x.get(k) if isinstance(x, dict) else None, path.split("/"), d)


def num(v, factor=1.0) -> float | None:
    try:
        return float(v) * factor if math.isfinite(float(v) * factor) else None
    except (TypeError, ValueError):
        return None


def to_nm(scale, units) -> float | None:
    v = num(scale, TO_NM.get(str(units).strip()) or TO_NM.get(str(units).strip().lower()) or math.nan)
    return v if v and v > 0 else None


def instrument(meta: dict, vendor: str) -> dict:
    out = {}
    for key, spec in (f.split("=") for f in INSTRUMENT.get(vendor, "").split("|") if f):
        path, _, factor = spec.partition("*")
        v = num(dig(meta, path), float(factor)) if factor else dig(meta, path)
        out = {key: v, **out} if v not in (None, "", "Unknown") else out
    return out


def check_size(h: int, w: int, cfg: IngestConfig) -> None:
    if h * w > cfg.max_pixels:
        raise Skip("too_large", f"{w}x{h} = {h * w} px > max_pixels {cfg.max_pixels}")


def read_rsciio(path: Path, kind: str, cfg: IngestConfig):
    name = {"dm": "digitalmicrograph", "emd": "emd", "hdf5": "hspy"}[kind]
    try:
        sigs = __import__(f"rsciio.{name}", fromlist=["file_reader"]).file_reader(
            str(path), lazy=True, **({"select_type": "images"} if kind == "emd" else {}))
    except OSError as e:
        if kind == "hdf5" and "HyperSpy" in str(e):    # not a HyperSpy file: an atomap Atom_Lattice file?
            return (yield from read_h5(path, cfg))
        raise
    for si, s in enumerate(sigs):
        axes, data, md, om = s["axes"], s["data"], s.get("metadata") or {}, s.get("original_metadata") or {}
        if any(a.get("navigate") for a in axes[-2:]) or sum(not a.get("navigate") for a in axes) != 2 \
                or data.ndim != len(axes) or data.dtype.names:
            continue                                    # spectra, profiles, structured RGB: not micrographs
        acq, tags = md.get("Acquisition_instrument") or {}, [v["ImageTags"] for v in (om.get("ImageList") or {}).values()
                                                            if "ImageTags" in v] or [{}]     # DM: the last image's tags
        inst = {**({"acquisition_instrument": acq} if acq else {}),
                **instrument(tags[-1].get("Microscope Info") if kind == "dm" else om, kind)}
        (y, x), modality = axes[-2:], "TEM" if kind != "hdf5" or "TEM" in acq else "SEM" if "SEM" in acq else None
        px, py = to_nm(x.get("scale"), x.get("units")), to_nm(y.get("scale"), y.get("units"))
        yield {**SIGNAL, "stack": data.reshape((-1,) + tuple(data.shape[-2:])), "pixel_size_nm": px, "instrument": inst,
               "modality": modality, "prov": {"reader": f"rsciio.{name}", "signal": si, "title": dig(md, "General/title"),
                                              "axis_scale": x.get("scale"), "axis_units": x.get("units"),
                                              **({"pixel_size_y_nm": py} if px and py and abs(py / px - 1) > 1e-3 else {})}}


def read_h5(path: Path, cfg: IngestConfig) -> list[dict]:      # the original image of an atomap file, or largest 2-D
    import h5py
    with h5py.File(path, "r") as f:
        found = []
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 2 and o.dtype.kind in "uif"
                     and min(o.shape) > 1 else None)
        if not found:
            return []
        name = max(found, key=lambda n: ("original_image" in n, "image" in n, f[n].size))
        check_size(*f[name].shape, cfg)
        data, attrs = f[name][()], _py(dict(f[name].parent.attrs))
    return [{**SIGNAL, "stack": data[None], "pixel_size_nm": to_nm(attrs.get("pixel_size"), attrs.get("units")),
             "prov": {"reader": "h5py", "dataset": name, "attrs": attrs}}]    # atomap: pixel_size without units -> null


def read_tiff(path: Path, cfg: IngestConfig) -> list[dict]:
    import tifffile
    with tifffile.TiffFile(path) as tif:
        s, tags = tif.series[0], tif.pages.first.tags
        fei, sem, ij = tif.fei_metadata or {}, tif.sem_metadata or {}, tif.imagej_metadata or {}
        axes, h = s.axes, s.shape[s.axes.index("Y")]
        check_size(h, s.shape[axes.index("X")], cfg)
        xres = tags["XResolution"].value if "XResolution" in tags else None
        try:
            data = tifffile.memmap(path, series=0, mode="r")      # lazy: a slice reads only what it touches
        except Exception:
            data = s.asarray()
    if "S" in axes and axes[-1] != "S":
        data, axes = np.moveaxis(data, axes.index("S"), -1), axes.replace("S", "") + "S"
    colour = ("RGB" if data.shape[-1] >= 3 else "LA") if axes.endswith("S") else None
    sig = {**SIGNAL, "stack": data.reshape((-1,) + data.shape[-3 if colour else -2:]), "colour": colour,
           "prov": {"reader": "tifffile", "vendor": "fei" if fei else "zeiss" if sem else "imagej" if ij else None}}
    if fei:
        res_y = int(num(dig(fei, "Image/ResolutionY")) or num(dig(fei, "Scan/ResolutionY")) or 0)
        px = [to_nm(dig(fei, f"{b}/PixelWidth"), "m") for b in ("Scan", "EScan", "IScan") if dig(fei, f"{b}/PixelWidth")]
        return [{**sig, "pixel_size_nm": (px or [None])[0], "modality": "SEM", "bar_rows": h - res_y if 0 < res_y < h
                 else 0, "instrument": {"manufacturer": "FEI/Thermo Fisher", **instrument(fei, "fei")}}]
    if sem:                                # Zeiss: {key: (name, value[, unit])} -> SI values
        si = {k: num(t[1], SI.get(t[2], math.nan)) if len(t) > 2 else t[1] for k, t in sem.items()
              if isinstance(t, tuple) and len(t) > 1}
        return [{**sig, "pixel_size_nm": num(si.get("ap_pixel_size"), 1e9), "modality": "SEM",
                 "instrument": {"manufacturer": "Zeiss", **instrument(si, "zeiss")}}]
    return [{**sig, "pixel_size_nm": to_nm(xres[1] / xres[0], ij.get("unit")) if xres and xres[0] else None}]


def read_pil(path: Path, cfg: IngestConfig) -> list[dict]:
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None                           # max_pixels is the limit here, checked before decoding
    im = Image.open(path)
    check_size(im.height, im.width, cfg)
    gray, n = im.mode in ("L", "I", "F", "1") or im.mode.startswith("I;"), getattr(im, "n_frames", 1)
    frames = [np.asarray(im.seek(i) or (im if gray else im.convert("RGB"))) for i in range(n if cfg.frames == "all" else 1)]
    return [{**SIGNAL, "stack": np.stack(frames) * (np.uint8(255) if im.mode == "1" else 1), "prov": {"reader": "pillow",
             "n_frames_in_file": n}, "colour": None if gray else im.mode}]


def data_bar_rows(S: np.ndarray, h: int, max_frac: float) -> int:
    """Rows of the data bar at the bottom of an image of height h (0: none) from S, its bottom rows, column-strided: rows
    mostly of one background value reaching the bottom, some blank, high-contrast marks (text), unlike the rows above."""
    lo, hi = float(S.min()), float(S.max())
    if hi <= lo:
        return 0
    tol = 0.012 * (hi - lo)
    v = lo + np.bincount(np.round((S[-max(2, h // 50):] - lo) / tol).astype(np.int64).ravel()).argmax() * tol
    near, far = (np.abs(S - v) <= tol).mean(1), (np.abs(S - v) > 0.3 * (hi - lo)).mean(1)   # v: bottom background
    n, gap, maxgap, top = len(S), 0, max(2, h // 100), len(S)
    for r in range(n - 1, -1, -1):
        top, gap = (r, 0) if near[r] >= 0.5 else (top, gap + 1)
        if gap > maxgap:
            break
    for _ in range(maxgap):                                        # a border line of another constant value
        top -= bool(top > 0 and np.ptp(S[top - 1]) <= 2 * tol)
    rows, band, above = n - top, slice(top, n), near[max(0, top - max(3, h // 20)):top]
    ok = (max(3, 0.02 * h) <= rows <= max_frac * h and top > 0 and (near[band] >= 0.97).mean() >= 0.2
          and far[band].max() >= 0.01 and 0.001 <= far[band].mean() <= 0.5 and (above >= 0.5).mean() < 0.3)
    return rows if ok else 0


def phash(u8: np.ndarray) -> int:
    from PIL import Image
    low = (DCT @ np.asarray(Image.fromarray(u8).resize((32, 32), Image.Resampling.BOX), np.float64) @ DCT.T)[:8, :8]
    return int(np.packbits(low.ravel() > np.median(low.ravel()[1:])).view(">u8")[0])


def frame_images(get, h: int, w: int, eight_bit: bool, bar_rows: int, cfg: IngestConfig):
    """Yield (uint8 image, tile box or None, info) for one frame; get(rows, cols) returns a float32 block."""
    info, bar, method = {"window": None, "data_bar": None, "crop_box": None}, bar_rows, "metadata"
    if cfg.crop_data_bar and not bar and min(h, w) >= cfg.min_side:    # a bar is at most a quarter of the height
        S = np.nan_to_num(get(slice(int(h * 0.65), h), slice(None, None, math.ceil(w / 1024))))   # bottom rows, strided
        bar, method = data_bar_rows(S, h, 0.25), "row_stats"
    if bar and cfg.crop_data_bar:
        info["data_bar"], info["crop_box"], h = {"rows": bar, "method": method}, [0, 0, w, h - bar], h - bar
    if min(h, w) < cfg.min_side:
        raise Skip("too_small", f"{w}x{h}{' after the data-bar crop' if info['data_bar'] else ''} < min_side {cfg.min_side}")
    s = max(1, math.ceil(math.sqrt(h * w / 4e6)))                 # the window from <= 4M samples of the whole frame
    sample = (g := get(slice(0, h, s), slice(None, None, s)))[np.isfinite(g)]
    if sample.size == 0 or sample.min() == sample.max():
        raise Skip("blank", "constant image")
    lo, hi = (0.0, 255.0) if eight_bit else (float(x) for x in np.percentile(sample, cfg.percentiles))
    lo, hi = (lo, hi) if hi > lo else (float(sample.min()), float(sample.max()))
    info["window"], tiled, t = None if eight_bit else [lo, hi], max(h, w) > cfg.max_side, cfg.tile
    starts = lambda n: sorted({*range(0, n - t, t - cfg.tile_overlap), n - t}) if tiled and n > t else [0]  # noqa: E731
    for y0 in starts(h):                                            # edge tiles are aligned to the border
        for x0 in starts(w):
            y1, x1 = (min(h, y0 + t), min(w, x0 + t)) if tiled else (h, w)
            b = np.clip(np.rint((get(slice(y0, y1), slice(x0, x1)) - lo) * (255.0 / (hi - lo))), 0, 255)
            u8 = np.where(np.isnan(b), 0, b).astype(np.uint8)
            if u8.min() != u8.max():                        # a constant tile carries nothing
                yield u8, ([x0, y0, x1, y1] if tiled else None), info


def ingest_file(path: Path, cfg: IngestConfig, img_dir: Path, counts: Counter) -> tuple[list[dict], str]:
    from PIL import Image
    kind = EXTS.get(path.suffix.lower())
    if path.stat().st_size == 0 or kind is None:
        raise Skip("empty_file") if kind else Skip("unsupported_extension", path.suffix or "(none)")
    sigs = list({"tiff": read_tiff, "pil": read_pil}.get(kind, lambda p, c: read_rsciio(p, kind, c))(path, cfg))
    with path.open("rb") as fh:                                                      # streamed: files reach GBs
        sha, src = hashlib.file_digest(fh, "sha256").hexdigest(), str(path.resolve())
    rows, skips, last_skip = [], Counter(), None
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60] + "_" + hashlib.sha1(src.encode()).hexdigest()[:8]
    for si, sig in enumerate(sigs):
        stack, colour, (n, h, w) = sig["stack"], sig["colour"], sig["stack"].shape[:3]
        check_size(h, w, cfg)
        for f in range(n if cfg.frames == "all" else 1):
            def get(ys, xs, f=f, stack=stack, colour=colour):
                a = stack[f, ys, xs]
                a = np.asarray(a.compute() if hasattr(a, "compute") else a, dtype=np.float32)
                return (a[..., :3] @ np.float32([0.299, 0.587, 0.114]) if a.shape[-1] > 2 else a[..., 0]) if colour else a
            try:
                for u8, box, info in frame_images(get, h, w, stack.dtype == np.uint8, sig["bar_rows"], cfg):
                    name = stem + (f"_s{si}" if len(sigs) > 1 else "") + (f"_f{f}" if n > 1 else "") \
                        + (f"_y{box[1]}_x{box[0]}" if box else "")          # unique: the stem hashes the path
                    Image.fromarray(u8).save(img_dir / f"{name}.png", compress_level=3)
                    prov = {"file": src, "sha256": sha, "format": path.suffix.lower()[1:], **sig["prov"], "frame": f,
                            "n_frames": n, "frames": cfg.frames, "original_shape": [h, w], "dtype": str(stack.dtype),
                            "colour": colour, "percentiles": info["window"] and cfg.percentiles, **info, "tile_box": box,
                            "pixel_sha256": hashlib.sha256(u8.tobytes()).hexdigest(), "phash": f"{phash(u8):016x}"}
                    rows.append({"id": name, "path": f"images/{name}.png", "split": None, "source": src,
                                 "modality": sig["modality"] or cfg.default_modality, "width": u8.shape[1],
                                 "height": u8.shape[0], "pixel_size_nm": sig["pixel_size_nm"],
                                 "instrument": _py(sig["instrument"]), "provenance": _py(prov), "ground_truth": None})
            except Skip as e:
                skips[e.args[0]], last_skip = skips[e.args[0]] + 1, e
    if not rows:
        raise last_skip or Skip("no_image_data", "no 2-D image in the file")
    counts.update(frames_skipped=sum(skips.values()), colour_converted=any(s["colour"] for s in sigs))
    r, bar, px = rows[0], rows[0]["provenance"]["data_bar"], rows[0]["pixel_size_nm"]
    return rows, ", ".join(x for x in [f"{len(rows)} image(s) {r['width']}x{r['height']}", px and f"{px:.4g} nm/px",
                                       bar and f"data bar {bar['rows']} rows cropped ({bar['method']})"] if x)


def group_and_split(rows: list[dict], cfg: IngestConfig) -> dict:
    """Duplicate clusters (same pixels, or pHash within the threshold, across files) and split groups (clusters joined
    with every image of one file) by union-find; groups, shuffled by the seed, go to the split furthest below its share."""
    n, first, seen, exact = len(rows), {}, {}, 0
    dup, grp, src = list(range(n)), list(range(n)), np.array([first.setdefault(r["source"], i) for i, r in enumerate(rows)])
    sha = np.unique([r["provenance"]["pixel_sha256"] for r in rows], return_inverse=True)[1].reshape(-1)
    hashes = np.array([int(r["provenance"]["phash"], 16) for r in rows], dtype=np.uint64)

    def find(p, i):
        while p[i] != i:
            p[i] = i = p[p[i]]
        return i

    for a in range(0, n, 256):                             # all pairs, blockwise: n^2/2 popcounts
        close = (np.bitwise_count(hashes[a:a + 256, None] ^ hashes[None, :]) <= cfg.dedup_threshold) \
            | (sha[a:a + 256, None] == sha[None, :])
        for i, j in zip(*np.nonzero(close & (src[a:a + 256, None] != src[None, :]))):
            for p in (dup, grp):
                p[find(p, a + i)] = find(p, j)
    clusters, groups, keep = {}, {}, set(range(n))
    for i in range(n):
        grp[find(grp, i)] = find(grp, src[i])
        clusters.setdefault(find(dup, i), []).append(i)
        exact += seen.setdefault(int(sha[i]), int(src[i])) != int(src[i])   # the same pixels as an image of another file
    for members in clusters.values():
        best = max(members, key=lambda i: (rows[i]["width"] * rows[i]["height"], rows[i]["pixel_size_nm"] is not None, -i))
        for i in members:
            rows[i]["provenance"]["dup_group"] = rows[best]["id"] if len(members) > 1 else None
            keep -= {i} if i != best and not cfg.keep_duplicates else set()
    for i in sorted(keep):
        groups.setdefault(find(grp, i), []).append(i)
    order, counts, share = sorted(groups.values()), Counter(), {"train": 1 - cfg.val_fraction - cfg.test_fraction,
                                                                  "validation": cfg.val_fraction, "test": cfg.test_fraction}
    random.Random(cfg.seed).shuffle(order)
    for members in order:
        split = max(share, key=lambda s: share[s] * len(keep) - counts[s])
        counts[split] += len(members)
        for i in members:
            rows[i]["split"], rows[i]["provenance"]["split_group"] = split, rows[members[0]]["id"]
    return {"keep": keep, "exact": exact, "near": n - len(clusters) - exact, "dropped": n - len(keep),
            "duplicate_clusters": sum(len(m) > 1 for m in clusters.values()), "split_groups": len(groups),
            "largest_group": max(map(len, groups.values()), default=0), "splits": dict(counts)}


def list_files(inputs: list[str], out: Path, counts: Counter) -> list[Path]:
    files, seen = [], set()
    for item in inputs:
        p, bad = Path(item).expanduser(), Counter()
        if not p.exists():
            raise SystemExit(f"input path '{item}' does not exist")
        found = [p]
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and out not in f.resolve().parents
                           and not any(s.startswith(".") for s in f.relative_to(p).parts))
        elif p.suffix.lower() in (".txt", ".jsonl"):     # a list of paths, relative to the list's folder
            lines = (p.read_text(encoding="utf-8", errors="replace").splitlines() if p.suffix.lower() == ".txt" else
                     [str(r.get("path") or r.get("source") or "") for r in read_jsonl(p, skip_bad=True, counts=bad)])
            found = [p.parent / Path(s.strip()).expanduser() for s in lines if s.strip() and s.strip()[0] != "#"]
        if bad["bad_json"]:
            counts["bad_list_lines"] += bad["bad_json"]
            log(f"skip {bad['bad_json']} line(s) of {p}: not a JSON object")
        files += [f for f in found if f.resolve() not in seen and not seen.add(f.resolve())]
    return files


def main(cfg: IngestConfig) -> dict:
    inputs = [cfg.inputs] if isinstance(cfg.inputs, str) else list(cfg.inputs)
    if (not cfg.out or not inputs or len(cfg.percentiles) != 2 or not 0 <= cfg.percentiles[0] < cfg.percentiles[1] <= 100
            or not 1 <= cfg.min_side <= cfg.tile or not 0 <= cfg.tile_overlap < cfg.tile
            or cfg.val_fraction < 0 or cfg.test_fraction < 0 or cfg.val_fraction + cfg.test_fraction >= 1):
        raise ConfigError("need --out DIR, --inputs (folders, files, .txt/.jsonl lists), percentiles [lo, hi] with 0 <= "
                          "lo < hi <= 100, 1 <= min_side <= tile, 0 <= tile_overlap < tile, val + test fractions < 1")
    t0, last, out, counts, outcomes, rows = time.time(), time.time(), Path(cfg.out).expanduser(), Counter(), Counter(), []
    files = list_files(inputs, out.resolve(), counts)
    (out / "images").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    [p.unlink() for p in (out / "images").glob("*.png")]        # an earlier run's images
    log(f"{len(files)} file(s) from {inputs} -> {out}")
    for i, path in enumerate(files, 1):
        try:
            if not path.exists():
                raise Skip("missing", "listed, but there is no such file")
            got, note = ingest_file(path, cfg, out / "images", counts)
            rows += got
            outcomes["ok"] += 1
            log(f"ok {path}: {note}")
        except Exception as e:                      # Skip, or a file no reader understands: named, counted, skipped
            reason, detail = (e.args[0], e.args[1:]) if isinstance(e, Skip) else ("out_of_memory", ["lower --max_pixels"]) \
                if isinstance(e, MemoryError) else ("unreadable", [f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"])
            outcomes[reason] += 1
            log(f"skip {path}: {reason}" + (f" ({detail[0]})" if detail and detail[0] else ""))
        if time.time() - last >= 10 or (i == len(files) and i >= 20):
            el, last = time.time() - t0, time.time()
            log(f"progress {i}/{len(files)} files, {i / el:.2f} files/s, ETA {el / i * (len(files) - i):.0f}s")
    dd = group_and_split(rows, cfg)
    kept = [r for i, r in enumerate(rows) if i in dd["keep"]]
    [(out / r["path"]).unlink() for i, r in enumerate(rows) if i not in dd["keep"]]   # dropped duplicates
    write_jsonl_atomic(out / "manifest.jsonl", kept)
    prov = [r["provenance"] for r in kept]
    stats = {"files": len(files), "outcomes": dict(outcomes.most_common()), "images": len(kept), "splits": dd["splits"],
             "tiles": sum(p["tile_box"] is not None for p in prov), **{k: counts[k] for k in ("colour_converted",
             "frames_skipped", "bad_list_lines")}, "pixel_size_known": sum(r["pixel_size_nm"] is not None for r in kept),
             "data_bar_cropped": dict(Counter(p["data_bar"]["method"] for p in prov if p["data_bar"])),
             "duplicates": {k: v for k, v in dd.items() if k not in ("keep", "splits")}, "seconds": round(time.time() - t0, 2)}
    (out / ".stats.json.tmp").write_text(json.dumps(stats, indent=2) + "\n")
    (out / ".stats.json.tmp").replace(out / "stats.json")
    log(f"outcomes {stats['outcomes']}; {len(kept)} image(s) {dd['splits']}; colour converted {counts['colour_converted']}"
        f"; duplicates exact {dd['exact']}, near {dd['near']}, dropped {dd['dropped']}; {stats['seconds']}s -> {out}")
    return stats


if __name__ == "__main__":
    main(load_config(IngestConfig))
