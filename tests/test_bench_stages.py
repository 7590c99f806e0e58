"""bench/bench_stages.py on the tiny shapes: every stage measured on both loops, and the ZeRO-2 vs ZeRO-3 runs."""
from __future__ import annotations

import json

import pytest
from conftest import reset_accelerate

from bench.bench_stages import VLM_STAGES, BenchConfig, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICK = dict(shape="tiny", seq_len=128, micro_batch_size=2, steps=2, warmup=1, rounds=1)


@pytest.mark.slow
def test_every_stage_reports_throughput_mfu_and_memory_of_both_loops(tmp_path, capsys):
    reset_accelerate()
    out = tmp_path / "bench.json"
    report = main(BenchConfig(**QUICK, zero=False, out=str(out)))
    stages = ["pretrain", "sft", "projector", "llm", "moe"]
    assert list(report["stages"]) == stages
    assert json.loads(out.read_text())["stages"] == json.loads(json.dumps(report["stages"]))
    for stage in stages:
        for loop in ("plain", "ours"):
            r = report["stages"][stage][loop]
            assert r["tokens_per_s"] > 0, (stage, loop)
            assert (r["samples_per_s"] > 0) if stage in VLM_STAGES else r["samples_per_s"] is None
            assert 0 < r["mfu_measured"] <= 1 and r["mfu_datasheet"] is None, (stage, loop, r)  # CPU: no datasheet
            assert r["peak_mem_gib"] > 0
        assert report["stages"][stage]["ours_over_plain"] > 0
    table = capsys.readouterr().out
    assert all(f"{stage:<10}ours" in table for stage in stages)


@pytest.mark.slow
def test_zero2_and_zero3_subprocesses_measure_the_moe_stage_in_every_round(tmp_path):
    """One DeepSpeed process per config loads the MoE VLM once per round: the second load under ZeRO-3 must work
    too (it did not while transformers' MoE modelling was first imported inside zero.Init)."""
    reset_accelerate()
    report = main(BenchConfig(**{**QUICK, "rounds": 2, "micro_batch_size": 1}, stages=["moe"],
                              out=str(tmp_path / "bench.json")))
    z = report["zero"]["moe"]
    assert z["zero2_error"] is None and z["zero3_error"] is None, z
    assert z["zero2_tokens_per_s"] > 0 and z["zero3_tokens_per_s"] > 0
    assert z["zero3_over_zero2"] == pytest.approx(z["zero3_tokens_per_s"] / z["zero2_tokens_per_s"])
    assert json.loads((tmp_path / "bench.json").read_text())["zero"] == report["zero"]


@pytest.mark.slow
def test_largest_micro_batch_search_finds_the_last_size_that_fits_in_gpu_memory(monkeypatch, capsys):
    """Out-of-memory stands in for the GPU: the plain loop fits 5 sequences, ours 11, from the configured 2."""
    from bench import bench_stages
    import torch

    def fake_loop(limit):
        def run(cfg, stage, *args):
            if bench_stages.micro_batch(cfg, stage) > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return {"rates": [100.0] * cfg.steps, "flops_per_token": 1.0}
        return run

    monkeypatch.setattr(bench_stages, "plain", fake_loop(5))
    monkeypatch.setattr(bench_stages, "ours", fake_loop(11))
    reset_accelerate()
    report = main(BenchConfig(**QUICK, stages=["pretrain"], zero=False, find_max_micro_batch=True))
    assert report["stages"]["pretrain"]["plain"]["largest_micro_batch"] == 5
    assert report["stages"]["pretrain"]["ours"]["largest_micro_batch"] == 11
    reset_accelerate()
    capped = main(BenchConfig(**QUICK, stages=["pretrain"], zero=False, find_max_micro_batch=True, max_micro_batch=8))
    assert capped["stages"]["pretrain"]["ours"]["largest_micro_batch"] == 8
    assert "8+" in capsys.readouterr().out  # the cap, not a limit found
