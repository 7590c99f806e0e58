"""The built-in image dataset: procedurally rendered SEM/TEM micrographs, each with the ground truth it was drawn from.

    python data_prep/synth_micrographs.py --n 200 --out runs/demo/micrographs --seed 0             # CPU debug, ~10 s
    python data_prep/synth_micrographs.py --n 20000 --out /scratch/synth_micrographs --seed 0 --workers 16
    srun -N1 -c 16 python data_prep/synth_micrographs.py --n 100000 --out /scratch/synth_micrographs --workers 16

Categories are the ten of the public SEM dataset of Aversa et al. (2018) (semivlm.data.CATEGORIES), taken round-robin:
image i is category i % 10. Each image is seeded from (seed, i) alone, so any subset can be regenerated and the same
seed gives byte-identical PNGs and manifest. Categories differ by morphology only: pixel size, brightness, contrast,
noise, charging, defocus and edge brightening come from one distribution for all of them (data_prep/micrographs.py).
A `tem_fraction` of images are TEM-like (mass-thickness contrast, no edge brightening); a `data_bar_fraction` carry an
instrument data bar appended below the micrograph, with a scale bar whose length is right for the pixel size.

Outputs in --out: images/<id>.png (8-bit grayscale), manifest.jsonl (docs/manifest.md; written atomically; split
stratified by category, seeded), config.json. `--clean true` renders without noise, charging, defocus or data bar.
"""
from __future__ import annotations

import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.micrographs import render
from semivlm.config import ConfigError, load_config, save_config
from semivlm.data import CATEGORIES, write_jsonl_atomic

CATS = list(CATEGORIES)
# Huffman-only deflate: noisy micrographs gain nothing from LZ matching, and it is 1.4x faster with smaller files
PNG_OPTIONS = {"format": "PNG", "compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}
SPLITS = ("train", "validation", "test")


@dataclass
class SynthConfig:
    out: str = ""                  # output directory (required)
    n: int = 200                   # number of images, categories round-robin
    seed: int = 0
    size: int = 512                # width of the micrograph in px (height too, plus the data bar when drawn)
    data_bar_fraction: float = 0.5
    tem_fraction: float = 0.3
    defect_rate: float = 0.2       # share of images with 1-2 defects (contamination, bridging, missing feature, crack)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    workers: int = 1               # processes rendering images
    clean: bool = False            # no noise, charging, defocus or data bar (ground-truth checks)


def check(cfg: SynthConfig) -> None:
    """Bad values fail before any work, with a message naming the key."""
    if not cfg.out:
        raise ConfigError("key 'out' is required: the output directory (--out DIR)")
    if cfg.n < 1:
        raise ConfigError(f"key 'n' must be at least 1, got {cfg.n}")
    if cfg.size < 64:
        raise ConfigError(f"key 'size' must be at least 64 px, got {cfg.size}")
    if cfg.seed < 0:
        raise ConfigError(f"key 'seed' must be non-negative, got {cfg.seed}")
    if cfg.workers < 1:
        raise ConfigError(f"key 'workers' must be at least 1, got {cfg.workers}")
    for key in ("data_bar_fraction", "tem_fraction", "defect_rate", "val_fraction", "test_fraction"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"key '{key}' must be between 0 and 1, got {getattr(cfg, key)}")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise ConfigError(f"val_fraction + test_fraction must be below 1, got {cfg.val_fraction + cfg.test_fraction}")


def image_id(index: int, n: int) -> str:
    return f"synth_{index:0{max(6, len(str(n - 1)))}d}"


def make_image(cfg: SynthConfig, index: int) -> tuple[np.ndarray, dict]:
    """Image `index` and its manifest row (split still unset), from (seed, index) alone."""
    rng = np.random.default_rng([cfg.seed, index])
    category = CATS[index % len(CATS)]
    modality = "TEM" if rng.random() < cfg.tem_fraction else "SEM"
    data_bar = bool(rng.random() < cfg.data_bar_fraction)
    img, gt, instrument, prov = render(category, rng, cfg.size, modality, data_bar, cfg.defect_rate, cfg.clean)
    rid = image_id(index, cfg.n)
    row = {"id": rid, "path": f"images/{rid}.png", "split": None, "source": "synthetic", "modality": modality,
           "width": int(img.shape[1]), "height": int(img.shape[0]), "pixel_size_nm": prov.pop("pixel_size_nm"),
           "instrument": instrument,
           "provenance": {"generator": "data_prep/synth_micrographs.py", "seed": cfg.seed, "index": index, **prov},
           "ground_truth": gt}
    return img, row


_CFG: SynthConfig | None = None


def _init(cfg_dict: dict) -> None:
    global _CFG
    _CFG = SynthConfig(**cfg_dict)


def _work(index: int) -> dict:
    img, row = make_image(_CFG, index)
    Image.fromarray(img, mode="L").save(Path(_CFG.out) / row["path"], **PNG_OPTIONS)
    return row


def assign_splits(rows: list[dict], cfg: SynthConfig) -> None:
    """Per category, a seeded permutation: the first round(n_c * test_fraction) go to test, the next
    round(n_c * val_fraction) to validation, the rest to train. Disjoint by construction, stratified by category."""
    by_cat: dict[str, list[dict]] = {}
    for row in rows:
        by_cat.setdefault(row["ground_truth"]["category"], []).append(row)
    for k, cat in enumerate(CATS):
        members = by_cat.get(cat, [])
        order = np.random.default_rng([cfg.seed, 0x5EED, k]).permutation(len(members))
        n_test, n_val = round(len(members) * cfg.test_fraction), round(len(members) * cfg.val_fraction)
        for rank, j in enumerate(order):
            members[j]["split"] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"


def main(cfg: SynthConfig) -> dict:
    check(cfg)
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    print(f"rendering {cfg.n} micrographs of {cfg.size} px into {out} with {cfg.workers} worker(s)", flush=True)
    rows: list[dict] = []
    every, t0 = max(1, cfg.n // 20), time.perf_counter()
    pool = Pool(cfg.workers, initializer=_init, initargs=(asdict(cfg),)) if cfg.workers > 1 else None
    if pool is None:
        _init(asdict(cfg))
    try:
        results = pool.imap(_work, range(cfg.n), chunksize=4) if pool else map(_work, range(cfg.n))
        for i, row in enumerate(results, 1):
            rows.append(row)
            if i % every == 0 or i == cfg.n:
                dt = time.perf_counter() - t0
                rate = i / max(dt, 1e-9)
                print(f"{i}/{cfg.n} images  {rate:.1f} images/s  ETA {(cfg.n - i) / rate:.0f} s", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - t0
    assign_splits(rows, cfg)
    write_jsonl_atomic(out / "manifest.jsonl", rows)
    stats = {"n": len(rows), "seconds": round(seconds, 3), "images_per_s": round(len(rows) / seconds, 2),
             "categories": dict(Counter(r["ground_truth"]["category"] for r in rows)),
             "splits": dict(Counter(r["split"] for r in rows)),
             "modalities": dict(Counter(r["modality"] for r in rows)),
             "with_data_bar": sum(r["ground_truth"]["imaging"]["data_bar"] for r in rows),
             "with_defects": sum(bool(r["ground_truth"]["defects"]) for r in rows), "out": str(out)}
    print(f"wrote {stats['n']} images and {out / 'manifest.jsonl'} in {seconds:.1f} s ({stats['images_per_s']} "
          f"images/s); splits {stats['splits']}; modalities {stats['modalities']}", flush=True)
    return stats


if __name__ == "__main__":
    main(load_config(SynthConfig))
