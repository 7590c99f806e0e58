"""Peak memory and throughput of data_prep/build_corpus.py on a generated text corpus of a given size (issue 19:
≤ 1.5 GB peak on 2 GB of text, MB/s reported).

    python bench/bench_corpus.py --size_mb 2048 --num_workers 2          # the README figure (2-core machine)
    python bench/bench_corpus.py --size_mb 200                           # a quick look
    srun -N1 -c 16 python bench/bench_corpus.py --size_mb 20000 --num_workers 16

The corpus: .txt/.md files of 20-200 KB built from 4-word fragments of the built-in corpus (data/corpus), each
followed by a random number and unit, so that documents share vocabulary but few word 5-shingles (as different papers
do); 2 % are exact duplicates of an earlier file (upper case, other line breaks) and 2 % near duplicates (one word in
100 changed). It is written once under --work and reused while its size and seed match. The tokenizer is --tokenizer
(e.g. ~/.cache/semivlm/SmolLM2-135M-Instruct-hf) or, by default, the debug recipe's (byte-level BPE, vocabulary 2048,
trained on data/corpus), given to build_corpus as a pretrained one.

build_corpus runs as a child process. Reported: its wall time, MB/s of input, the peak of the resident memory summed
over its process tree (sampled every 0.1 s with psutil: driver plus worker processes) and the largest resident set of
any one of them (getrusage RUSAGE_CHILDREN, exact), the driver's and the workers' peaks apart and a timeline. Results
go to --out (default --work/bench_corpus_<size_mb>mb.json).
"""
from __future__ import annotations

import json
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from semivlm.config import load_config

REPO = Path(__file__).resolve().parents[1]
UNITS = ["nm", "mTorr", "sccm", "W", "keV", "C", "s", "A/s", "mJ/cm2", "ohm/sq", "%", "um", "eV", "Pa"]


@dataclass
class BenchCorpusConfig:
    size_mb: int = 200            # generated text, MB (10^6 bytes)
    work: str = "runs/bench_corpus"
    num_workers: int = 2          # build_corpus --num_workers
    block_size: int = 2048
    seed: int = 0
    goal_gb: float = 1.5          # the bound on peak memory
    tokenizer: str = ""           # tokenizer dir given to build_corpus; "" = the debug recipe's BPE (trained here)
    out: str = ""                 # the JSON result; "" = <work>/bench_corpus_<size_mb>mb.json


def fragments() -> list[str]:
    words = re.findall(r"[A-Za-z][A-Za-z0-9\-/]*", " ".join(p.read_text() for p in sorted((REPO / "data/corpus").glob("*.md"))))
    return sorted({" ".join(words[i:i + 4]) for i in range(0, len(words) - 4, 2)})


def make_text(rng: np.random.Generator, frags: list[str], chars: int, title: str) -> str:
    n = max(12, chars // 36)
    parts = [f"{frags[a]} {b / 10:g} {UNITS[c]}" for a, b, c in zip(rng.integers(0, len(frags), n).tolist(),
                                                                     rng.integers(0, 10**6, n).tolist(),
                                                                     rng.integers(0, len(UNITS), n).tolist())]
    return f"# {title}\n\n" + "\n\n".join(", ".join(parts[i:i + 10]) + "." for i in range(0, n, 10)) + "\n"


def generate(root: Path, size_mb: int, seed: int) -> dict:
    """Write the corpus under root (reused when its manifest matches)."""
    manifest = root / "manifest.json"
    want = {"size_mb": size_mb, "seed": seed}
    if manifest.is_file() and json.loads(manifest.read_text()).get("spec") == want:
        return json.loads(manifest.read_text())
    shutil.rmtree(root, ignore_errors=True)
    rng, pyrng, frags = np.random.default_rng(seed), random.Random(seed), fragments()
    total, n, dups, t0, recent = 0, 0, {"exact": 0, "near": 0}, time.time(), []
    while total < size_mb * 10**6:
        folder = root / f"part{n // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        roll = pyrng.random()
        if recent and roll < 0.02:                                   # exact duplicate, written differently
            text = recent[pyrng.randrange(len(recent))].upper().replace(" ", "\n", 50)
            dups["exact"] += 1
        elif recent and roll < 0.04:                                 # near duplicate: 1 word in 100 changed
            words = recent[pyrng.randrange(len(recent))].split(" ")
            words[::100] = ["revised"] * len(words[::100])
            text = " ".join(words)
            dups["near"] += 1
        else:
            text = make_text(rng, frags, pyrng.randint(20_000, 200_000), f"Process report {n}")
            recent = (recent + [text])[-50:]
        path = folder / f"doc{n:07d}.{'md' if n % 3 == 0 else 'txt'}"
        total += path.write_text(text)
        n += 1
    info = {"spec": want, "files": n, "bytes": total, "duplicates": dups, "seconds": round(time.time() - t0, 1)}
    manifest.write_text(json.dumps(info, indent=2))
    return info


def debug_tokenizer(path: Path) -> Path:
    from data_prep.build_corpus import train_tokenizer

    if not (path / "tokenizer.json").is_file():
        texts = [p.read_text() for p in sorted((REPO / "data/corpus").glob("*.md"))]
        train_tokenizer(texts, 2048).save_pretrained(str(path))
    return path


def run_measured(cmd: list[str]) -> dict:
    """Run cmd; sample the summed RSS of its process tree every 0.1 s. The driver's and the workers' peaks are kept
    apart, and a sample every 10 s goes to `rss_timeline` (seconds, driver MB, workers MB): memory that grows with
    the corpus shows there as a trend rather than one number."""
    t0, last = time.time(), -10.0
    proc = subprocess.Popen(cmd, cwd=REPO)
    root, peak_tree, peak_driver, peak_workers, timeline = psutil.Process(proc.pid), 0, 0, 0, []
    while proc.poll() is None:
        try:
            driver = root.memory_info().rss
            workers = sum(p.memory_info().rss for p in root.children(recursive=True) if p.is_running())
            peak_tree, peak_driver = max(peak_tree, driver + workers), max(peak_driver, driver)
            peak_workers = max(peak_workers, workers)
            if time.time() - t0 - last >= 10:
                last = time.time() - t0
                timeline.append((round(last), round(driver / 2**20), round(workers / 2**20)))
        except psutil.Error:
            pass
        time.sleep(0.1)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)      # the driver and the pool workers it reaped
    return {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_tree_rss_mb": round(peak_tree / 2**20), "peak_driver_rss_mb": round(peak_driver / 2**20),
            "peak_workers_rss_mb": round(peak_workers / 2**20),
            "max_single_process_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "rss_timeline": timeline}


def main(cfg: BenchCorpusConfig) -> dict:
    work = Path(cfg.work)
    t0 = time.time()
    corpus = generate(work / f"text_{cfg.size_mb}mb", cfg.size_mb, cfg.seed)
    print(f"[bench_corpus] corpus: {corpus['files']} files, {corpus['bytes'] / 1e6:.0f} MB, duplicates "
          f"{corpus['duplicates']} ({time.time() - t0:.0f}s)", flush=True)
    tok = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else debug_tokenizer(work / "tokenizer")
    out = work / f"out_{cfg.size_mb}mb"
    cmd = [sys.executable, "data_prep/build_corpus.py", "--inputs", str((work / f"text_{cfg.size_mb}mb").resolve()),
           "--tokenizer", str(tok.resolve()), "--block_size", str(cfg.block_size), "--num_workers",
           str(cfg.num_workers), "--out", str(out.resolve())]
    print("[bench_corpus] " + " ".join(cmd), flush=True)
    run = run_measured(cmd)
    if run["returncode"] != 0:
        raise SystemExit(f"build_corpus failed with exit code {run['returncode']}")
    stats = json.loads((out / "stats.json").read_text())
    result = {"config": asdict(cfg), "command": " ".join(cmd), "corpus": corpus, **run,
              "input_mb": stats["input_mb"], "mb_per_s": round(stats["input_mb"] / run["seconds"], 2),
              "tokens": stats["tokens"], "documents_kept": stats["documents_kept"],
              "tokenizer": stats["tokenizer"]["source"],
              # CPU-bound: on a shared machine the wall-clock MB/s is set by the load, MB per CPU-second is not
              "mb_per_cpu_s": round(stats["input_mb"] / max(run["cpu_seconds"], 1e-9), 2),
              "duplicates_removed": stats["duplicates_removed"], "cpus": psutil.cpu_count(),
              "goal_met": run["peak_tree_rss_mb"] <= cfg.goal_gb * 1024}
    dest = Path(cfg.out) if cfg.out else work / f"bench_corpus_{cfg.size_mb}mb.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench_corpus] {stats['input_mb']:.0f} MB in {run['seconds']}s = {result['mb_per_s']} MB/s "
          f"({cfg.num_workers} workers, {psutil.cpu_count()} CPUs; {result['mb_per_cpu_s']} MB per CPU-second, "
          f"{run['cpu_seconds']} CPU-s); peak RSS of the process tree "
          f"{run['peak_tree_rss_mb']} MB (largest single process {run['max_single_process_rss_mb']} MB); "
          f"goal <= {cfg.goal_gb} GB {'met' if result['goal_met'] else 'NOT met'} -> {dest}", flush=True)
    return result


if __name__ == "__main__":
    main(load_config(BenchCorpusConfig))
