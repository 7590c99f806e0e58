"""Throughput of the data pipeline: the synthetic micrograph generator (images/s) and teacher annotation (records/s
against a fault-free fake OpenAI-compatible server on 127.0.0.1, cold and from the cache).

CPU, one core (the figure quoted for the generator: 512x512, one process, PNGs written to a temporary folder):
    taskset -c 0 python bench/bench_data.py --n 200
All cores of a node (adds a multi-process run of the same images):
    python bench/bench_data.py --n 2000 --workers 16
SLURM:
    srun -N1 -c 16 python bench/bench_data.py --n 4000 --workers 16

train_moe.py at scale (issue 19's goals: peak memory per rank flat in the number of records, time to the first
optimizer step, data-wait share with 2 DataLoader workers), 2,000 vs 20,000 caption records over 200 rendered files:
    python bench/bench_data.py --sections "[train_moe]"

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
    # train_moe section: caption records pointing (repeatedly, under new ids) at `moe_files` rendered micrographs of
    # moe_size px, a random CLIP tower of that size (patch 14: 576 patches), the projector stage once per record
    # count (index built), again (index reused), then the llm stage for the data-wait share
    moe_records: list[int] = field(default_factory=lambda: [2000, 20000])
    moe_files: int = 200
    moe_size: int = 336
    moe_steps: int = 20
    moe_micro_batch: int = 8
    moe_workers: int = 2


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


# ============================================================================== train_moe (memory, start-up, data wait)
def _tiny_llm(out: Path, texts: list[str]) -> Path:
    """A random tiny Llama with a locally trained ChatML tokenizer (what train_sft.py exports in the debug recipe)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from data_prep.build_corpus import train_tokenizer

    tok = train_tokenizer(texts * 3, vocab_size=400)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _caption_records(manifest: Path, out: Path, n: int) -> Path:
    """n caption records (ids cap-000000 …) cycling over the manifest's images; paths relative to `out`'s folder."""
    import json

    images = [json.loads(line) for line in manifest.read_text().splitlines()]
    with out.open("w") as f:
        for i in range(n):
            row = images[i % len(images)]
            path = os.path.relpath(manifest.parent / row["path"], out.parent)
            text = f"A {(row.get('ground_truth') or {}).get('category', 'sample')} micrograph, {row['width']} px wide."
            f.write(json.dumps({"id": f"cap-{i:06d}", "images": [path], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this micrograph."}]},
                {"role": "assistant", "content": [{"type": "text", "text": text}]}],
                "meta": {"split": "train", "task": "caption"}}) + "\n")
    return out


def _run_train_moe(args: list[str]) -> dict:
    """train_moe.py as its own process: time to the first optimizer step (from launch), index build time, data-wait
    shares, the rank's peak RSS (its history's ru_maxrss) and the workers' summed peak RSS (polled)."""
    import json
    import re
    import subprocess
    import threading

    import psutil

    repo = Path(__file__).resolve().parents[1]
    t0 = time.perf_counter()
    # unbuffered: through a pipe Python holds its output in 8 KB blocks, and a log line read late is a phase timed late
    proc = subprocess.Popen([sys.executable, str(repo / "train_moe.py"), *args], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, first_step, workers_peak, seen = [], [None], [0], {}
    # where start-up time goes: seconds from launch to the first log line of each phase
    phases = {"model loaded": r"attention ", "train index": r"train: \d+ samples", "loop set up": r"training [\d,]+ of",
              "step 1": r"step 1/"}

    def read():
        for line in proc.stdout:
            lines.append(line)
            for name, pattern in phases.items():
                if name not in seen and re.match(pattern, line):
                    seen[name] = round(time.perf_counter() - t0, 1)
            if first_step[0] is None and re.match(r"step 1/", line):
                first_step[0] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rank = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            workers_peak[0] = max(workers_peak[0], sum(c.memory_info().rss for c in rank.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.2)
    reader.join()
    log = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"train_moe.py {' '.join(args)} failed:\n{log[-3000:]}")
    out = Path(args[args.index("--output_dir") + 1])
    history = [h for h in json.loads((out / "history.json").read_text()) if "data_wait" in h]
    build = re.search(r"train: built the record index \S+ in ([\d.]+)s", log)
    return {"first_step_s": first_step[0], "index_build_s": float(build.group(1)) if build else 0.0,
            "index_reused": "record index reused" in log, "wall_s": time.perf_counter() - t0, "phases_s": seen,
            "rank_peak_rss_gib": max(h["peak_mem_gib"] for h in history), "workers_peak_rss_gib": workers_peak[0] / 2**30,
            "data_wait_first": history[0]["data_wait"],
            "data_wait_mean": sum(h["data_wait"] for h in history[1:]) / max(1, len(history) - 1),
            "tokens_per_s": sum(h["tokens_per_s"] for h in history[1:]) / max(1, len(history) - 1)}


def bench_train_moe(cfg: BenchDataConfig) -> dict:
    """train_moe.py on cfg.moe_records caption records of cfg.moe_size px: peak memory per rank, time to the first
    optimizer step with the index built and reused, and the data-wait share of the llm stage with moe_workers."""
    import json

    tiny_clip = {"model_type": "clip_vision_model", "image_size": cfg.moe_size, "patch_size": 14, "hidden_size": 64,
                 "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_main(SynthConfig(out=str(tmp / "micrographs"), n=cfg.moe_files, size=cfg.moe_size, seed=cfg.seed))
        (tmp / "data").mkdir()
        llm = _tiny_llm(tmp / "llm", ["Describe this micrograph.", "A micrograph, px wide."] +
                        [f"A {c} micrograph" for c in ("particles", "grains", "pores", "lines", "wires", "sample")])
        common = ["--max_length", "640", "--micro_batch_size", str(cfg.moe_micro_batch), "--max_steps",
                  str(cfg.moe_steps), "--warmup_steps", "1", "--eval_every", "0", "--save_every", "0", "--log_every", "1",
                  "--classify_eval", "0", "--num_workers", str(cfg.moe_workers), "--ds_config", "ds_configs/zero3_fp32.json"]
        for n in cfg.moe_records:
            data = _caption_records(tmp / "micrographs/manifest.jsonl", tmp / f"data/captions_{n}.jsonl", n)
            args = ["--stage", "projector", "--init_from", str(llm), "--vision_config", json.dumps(tiny_clip),
                    "--train_data", json.dumps([str(data)]), "--output_dir", str(tmp / f"projector_{n}"), *common]
            results[f"projector_{n}_built"] = _run_train_moe(args)
            results[f"projector_{n}_reused"] = _run_train_moe(args)
        n = cfg.moe_records[0]
        data = str(tmp / f"data/captions_{n}.jsonl")
        for workers in (cfg.moe_workers, 0):
            args = ["--stage", "llm", "--init_from", str(tmp / f"projector_{n}/final"), "--train_data",
                    json.dumps([data]), "--output_dir", str(tmp / f"llm_{workers}"), *common, "--num_workers", str(workers)]
            results[f"llm_{n}_workers{workers}"] = _run_train_moe(args)
    print(f"\ntrain_moe: caption records over {cfg.moe_files} rendered micrographs of {cfg.moe_size} px, random CLIP "
          f"tower (patch 14), micro-batch {cfg.moe_micro_batch}, {cfg.moe_steps} steps, one process")
    print(f"{'run':<26}{'first step s':>13}{'index build s':>14}{'rank peak GiB':>14}{'workers GiB':>12}"
          f"{'data wait':>10}{'tok/s':>8}")
    for name, r in results.items():
        print(f"{name:<26}{r['first_step_s']:>13.1f}{r['index_build_s']:>14.1f}{r['rank_peak_rss_gib']:>14.3f}"
              f"{r['workers_peak_rss_gib']:>12.2f}{100 * r['data_wait_mean']:>9.1f}%{r['tokens_per_s']:>8.0f}  "
              f"{r['phases_s']}")
    small, large = (results[f"projector_{n}_built"] for n in (cfg.moe_records[0], cfg.moe_records[-1]))
    results["peak_rss_difference_mb"] = 1024 * (large["rank_peak_rss_gib"] - small["rank_peak_rss_gib"])
    reused = ", ".join(f"{results[k]['first_step_s']:.1f} s" for k in results if k.endswith("_reused"))
    print(f"peak RSS per rank, {cfg.moe_records[-1]} vs {cfg.moe_records[0]} records: "
          f"{results['peak_rss_difference_mb']:+.0f} MB (goal <= 300 MB); first step with the index reused: "
          f"{reused} (goal <= 15 s)")
    print(f"command: {command_line()}")
    return results


SECTIONS = {"generator": bench_generator, "annotation": bench_annotation, "train_moe": bench_train_moe}


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
