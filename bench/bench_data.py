"""Throughput of the data pipeline: the synthetic micrograph generator (images/s) and teacher annotation (records/s
against a fault-free fake OpenAI-compatible server on 127.0.0.1, cold and from the cache).

CPU, one core (the figure quoted for the generator: 512x512, one process, PNGs written to a temporary folder):
    taskset -c 0 python bench/bench_data.py --n 200
All cores of a node (adds a multi-process run of the same images):
    python bench/bench_data.py --n 2000 --workers 16
SLURM:
    srun -N1 -c 16 python bench/bench_data.py --n 4000 --workers 16

Each section is one function `bench_<name>(cfg) -> dict` registered in SECTIONS; `--sections "[generator]"` picks
some. The generator section times data_prep/synth_micrographs.py's own main() end to end (render, PNG encode and
write, manifest), after a short warm-up, and also reports the CPU time per image of the single-process run, which is
what a busy shared machine distorts least.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.synth_micrographs import SynthConfig, main as synth_main
from semivlm.config import ConfigError, load_config


@dataclass
class BenchDataConfig:
    sections: list[str] = field(default_factory=lambda: ["generator", "annotation"])
    n: int = 200               # images per timed generator run
    size: int = 512
    workers: int = 1           # > 1 adds a multi-process generator run
    warmup: int = 10
    seed: int = 0
    annotate_images: int = 64  # images sent to the fake teacher server
    concurrency: int = 8       # requests in flight
    server_delay_s: float = 0.0  # simulated model latency per request


def command_line() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"python {' '.join(sys.argv)}  ({cores} cores visible, OMP_NUM_THREADS={threads})"


# ============================================================================================ generator (images/s)
def bench_generator(cfg: BenchDataConfig) -> dict:
    """Images/s of synth_micrographs.main at cfg.size, single process and (if cfg.workers > 1) cfg.workers processes."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        synth_main(SynthConfig(out=f"{tmp}/warm", n=cfg.warmup, size=cfg.size, seed=cfg.seed + 1))
        runs = [1] + ([cfg.workers] if cfg.workers > 1 else [])
        for workers in runs:
            cpu0, t0 = time.process_time(), time.perf_counter()
            stats = synth_main(SynthConfig(out=f"{tmp}/w{workers}", n=cfg.n, size=cfg.size, seed=cfg.seed,
                                           workers=workers))
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            results[workers] = {"images_per_s": cfg.n / wall, "wall_s": wall,
                                "cpu_ms_per_image": 1000 * cpu / cfg.n if workers == 1 else None,
                                "categories": stats["categories"]}
    print(f"\ngenerator: {cfg.n} images of {cfg.size}x{cfg.size} (+ data bar on about half), PNG written")
    print(f"{'processes':<11}{'images/s':>10}{'wall s':>9}{'CPU ms/image':>14}")
    for workers, r in results.items():
        cpu = f"{r['cpu_ms_per_image']:.1f}" if r["cpu_ms_per_image"] is not None else "-"
        print(f"{workers:<11}{r['images_per_s']:>10.1f}{r['wall_s']:>9.1f}{cpu:>14}")
    print(f"command: {command_line()}")
    return results


# =========================================================================================== annotation (records/s)
def bench_annotation(cfg: BenchDataConfig) -> dict:
    """Records/s of annotate.py --teacher openai against the tests' fake server (in this process, so on a small CPU
    server and client share the GIL: a floor for the client), then of a rerun served from the disk cache."""
    # the fake server is a test helper, not part of the installed packages: the one path this bench must add
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fake_openai_server import benchmark_against_fake_server

    r = benchmark_against_fake_server(cfg.annotate_images, cfg.concurrency, cfg.server_delay_s)
    print(f"\nannotation: {r['n_images']} images, concurrency {r['concurrency']}, server delay {r['server_delay_s']} s, "
          f"{r['requests']} requests, {r['records']} records")
    print(f"records/s {r['records_per_s']:.0f} | images/s {r['images_per_s']:.1f} | "
          f"from cache {r['cached_records_per_s']:.0f} records/s")
    print(f"command: {command_line()}")
    return r


SECTIONS = {"generator": bench_generator, "annotation": bench_annotation}


def main(cfg: BenchDataConfig) -> dict:
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"key 'sections': unknown section(s) {unknown}; choose from {sorted(SECTIONS)}")
    if cfg.n < 1 or cfg.size < 64 or cfg.workers < 1:
        raise ConfigError(f"need n >= 1, size >= 64 and workers >= 1, got n={cfg.n} size={cfg.size} "
                          f"workers={cfg.workers}")
    return {name: SECTIONS[name](cfg) for name in cfg.sections}


if __name__ == "__main__":
    main(load_config(BenchDataConfig))
