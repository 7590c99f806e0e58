"""Start-up work that every run used to repeat before its first optimizer step (issue 19: time to the first step)."""
from __future__ import annotations

import json

import torch

from semivlm import loop


def test_the_cpu_matmul_ceiling_is_measured_in_full_once_per_machine_then_read_from_the_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("SEMIVLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loop, "measure_peak_tflops",
                        lambda device, dtype, quick=False: calls.append((dtype, quick)) or (0.1 if quick else 0.25))
    first = loop.cached_peak_tflops(torch.device("cpu"), torch.float32)
    second = loop.cached_peak_tflops(torch.device("cpu"), torch.float32)
    assert calls == [(torch.float32, False), (torch.float32, True)] and first[0] == second[0] == 0.25
    assert first[1] == "measured torch.float32 matmul on cpu" and "cached in" in second[1]
    saved = json.loads((tmp_path / "cache/peak_tflops.json").read_text())
    assert list(saved.values()) == [0.25] and f"{torch.get_num_threads()} threads" in next(iter(saved))
    # another thread count is another ceiling: measured again
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    loop.cached_peak_tflops(torch.device("cpu"), torch.float32)
    assert calls[-1] == (torch.float32, False) and len(json.loads((tmp_path / "cache/peak_tflops.json").read_text())) == 2


def test_a_ceiling_cached_while_the_machine_was_busy_is_raised_by_a_later_quick_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIVLM_CACHE", str(tmp_path / "cache"))
    rates = iter([0.003, 0.09, 0.05])  # full probe under load, then two quick probes, the first on an idle machine
    monkeypatch.setattr(loop, "measure_peak_tflops", lambda device, dtype, quick=False: next(rates))
    assert [loop.cached_peak_tflops(torch.device("cpu"), torch.float32)[0] for _ in range(3)] == [0.003, 0.09, 0.09]
    assert list(json.loads((tmp_path / "cache/peak_tflops.json").read_text()).values()) == [0.09]


def test_an_unwritable_cache_only_costs_the_measurement(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SEMIVLM_CACHE", str(tmp_path / "file"))  # a file where the folder should be
    monkeypatch.setattr(loop, "measure_peak_tflops", lambda device, dtype, quick=False: 0.5)
    assert loop.cached_peak_tflops(torch.device("cpu"), torch.float32)[0] == 0.5
