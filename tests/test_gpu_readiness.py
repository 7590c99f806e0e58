"""What the first run on H100s or on 8×A100 under SLURM relies on, checked on CPU (issue 18): MFU's denominator from
the card's real name, no recipe config pinning it, fp32 gradient accumulation in every ZeRO config, and the device
evaluate.py picks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from semivlm.loop import datasheet_tflops

ROOT = Path(__file__).resolve().parents[1]

# torch.cuda.get_device_name() strings as the cards report them, with their datasheet dense bf16 TFLOP/s
REAL_DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA H800": 989.0,
    "NVIDIA H800 PCIe": 756.0,
    "NVIDIA H20": 148.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A800-SXM4-80GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "NVIDIA A30": 165.0,
    "NVIDIA A40": 150.0,
    "Tesla V100-SXM2-32GB": 125.0,
}


@pytest.mark.parametrize("name", sorted(REAL_DEVICE_NAMES))
def test_mfu_peak_comes_from_the_exact_card_variant(name):
    assert datasheet_tflops(name) == REAL_DEVICE_NAMES[name], name


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090", "Tesla T4"])
def test_unlisted_cards_get_no_borrowed_figure(name):
    # A10G must not read as A10 nor RTX/T4 as anything: they fall back to the measured matmul ceiling
    assert datasheet_tflops(name) is None


def test_peak_tflops_reads_the_detected_card_and_config_still_overrides(monkeypatch):
    import torch

    from semivlm import loop

    class Acc:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    tflops, source = loop.peak_tflops(loop.TrainConfig(), Acc())
    assert tflops == 756.0 and "H100 PCIe" in source
    assert loop.peak_tflops(loop.TrainConfig(peak_tflops=500.0), Acc()) == (500.0, "configured")


def test_no_recipe_config_pins_the_mfu_peak():
    # a pinned A100 figure made MFU read 3.2x too high on an H100
    pinned = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "launch/configs").glob("*/*.yaml"))
              if "peak_tflops" in (yaml.safe_load(p.read_text()) or {})]
    assert pinned == []
