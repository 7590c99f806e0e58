"""launch/recipe.sh: stage selection from a config directory, skip-when-complete, rerun-from-a-deleted-stage, stop on
the first failure, resume of a stopped training stage. Every stage's command is run by a fake interpreter that
records it and writes the output a real stage would, so these tests check the shell logic in seconds; the real
stages run in tests/test_e2e_recipe.py."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "launch/recipe.sh"

FAKE_PYTHON = r"""#!/usr/bin/env bash
# records "<script> <output>" and creates the output a real stage writes
script=$(basename "$1"); shift
out=""; compare=0
while [[ $# -gt 0 ]]; do
    case $1 in --out|--output_dir) out=$2; shift ;; --compare) compare=1 ;; esac
    shift
done
echo "$script $out" >> "$FAKE_LOG"
[[ $script == "${FAKE_FAIL:-none}" ]] && { echo "boom in $script" >&2; exit 1; }
mkdir -p "$out"
if [[ $compare == 1 ]]; then echo "# report" > "$out/report.md"
elif [[ $script == train_* && $script != "${FAKE_STOP:-none}" ]]; then mkdir -p "$out/final"; echo {} > "$out/final/config.json"
fi
exit 0
"""


@pytest.fixture
def fake(tmp_path):
    py = tmp_path / "fake_python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(py), "FAKE_LOG": str(log)}
    env.pop("TRAIN_LAUNCHER", None)

    def run(*args, cfg=ROOT / "launch/configs/debug", **extra_env):
        log.write_text("")
        p = subprocess.run(["bash", str(RECIPE), str(cfg), str(tmp_path / "run"), *args],
                           env={**env, **extra_env}, capture_output=True, text=True, timeout=60)
        return p, [line.split()[0] for line in log.read_text().splitlines()]
    return run


def stage_names(listing: str) -> list[str]:
    return [line.split()[0] for line in listing.splitlines()]


def test_debug_config_lists_every_stage_in_order_and_wires_outputs(tmp_path):
    p = subprocess.run(["bash", str(RECIPE), str(ROOT / "launch/configs/debug"), str(tmp_path / "r"), "--list"],
                       capture_output=True, text=True, timeout=30, check=True)
    assert stage_names(p.stdout) == ["corpus", "micrographs", "annotations", "instructions", "pretrain", "sft", "dpo",
                                     "vision", "projector", "llm", "moe", "moe_dpo", "eval_dpo", "eval_llm", "eval_moe",
                                     "eval_moe_dpo", "gptq", "eval_gptq", "report"]
    lines = {line.split()[0]: line for line in p.stdout.splitlines()}
    r = tmp_path / "r"
    assert f"--init_from {r}/sft/final" in lines["dpo"]
    assert f"--vision_tower {r}/vision/final" in lines["projector"]
    assert f"--init_from {r}/llm/final" in lines["moe"]
    assert f"--init_from {r}/moe/final" in lines["moe_dpo"] and "preferences.jsonl" in lines["moe_dpo"]
    assert f"--model {r}/moe_dpo/final" in lines["gptq"]
    assert f"--model {r}/gptq" in lines["eval_gptq"]


def test_text_only_config_has_no_image_stages_and_quantises_the_chat_llm(tmp_path):
    cfg = tmp_path / "text_cfg"
    cfg.mkdir()
    for name in ("corpus", "pretrain", "sft", "evaluate", "gptq"):
        (cfg / f"{name}.yaml").write_text((ROOT / f"launch/configs/debug/{name}.yaml").read_text())
    p = subprocess.run(["bash", str(RECIPE), str(cfg), str(tmp_path / "r"), "--list"], capture_output=True, text=True,
                       timeout=30, check=True)
    assert stage_names(p.stdout) == ["corpus", "instructions", "pretrain", "sft", "eval_sft", "gptq", "eval_gptq",
                                     "report"]
    gptq = next(line for line in p.stdout.splitlines() if line.startswith("gptq"))
    assert f"--model {tmp_path}/r/sft/final" in gptq and "instructions.jsonl" in gptq


def test_rerun_of_a_finished_recipe_runs_nothing_and_a_deleted_stage_reruns_with_those_after_it(fake, tmp_path):
    p, calls = fake()
    assert p.returncode == 0, p.stderr
    assert len(calls) == 19 and (tmp_path / "run/report.md").is_file()
    p, calls = fake()
    assert p.returncode == 0 and calls == [], calls
    assert p.stdout.count("complete, skipped") == 19
    import shutil
    shutil.rmtree(tmp_path / "run/projector")
    p, calls = fake()
    assert p.returncode == 0, p.stderr
    assert calls == ["train_moe.py"] * 4 + ["evaluate.py"] * 4 + ["export_gptq.py", "evaluate.py", "evaluate.py"]
    assert "[recipe 8/19 vision] complete, skipped" in p.stdout


def test_changed_stage_config_reruns_that_stage_from_an_empty_directory_and_those_after_it(fake, tmp_path):
    import shutil

    cfg = tmp_path / "cfg"
    shutil.copytree(ROOT / "launch/configs/debug", cfg)
    assert fake(cfg=cfg)[0].returncode == 0
    stale = tmp_path / "run/moe/stale_checkpoint"
    stale.write_text("from the old config")
    (cfg / "moe.yaml").write_text((cfg / "moe.yaml").read_text() + "num_experts: 8\n")
    p, calls = fake(cfg=cfg)
    assert p.returncode == 0, p.stderr
    assert calls[0] == "train_moe.py" and calls.count("train_moe.py") == 2 and len(calls) == 9, calls  # moe, moe_dpo
    assert "config changed" in p.stdout and not stale.exists()


def test_first_failing_stage_stops_the_recipe_naming_it_and_its_log(fake, tmp_path):
    p, calls = fake(FAKE_FAIL="train_sft.py")
    assert p.returncode == 1
    assert calls[-1] == "train_sft.py" and "train_moe.py" not in calls
    log = tmp_path / "run/logs/sft.log"
    assert f"stage 'sft' (6/19) failed" in p.stderr and str(log) in p.stderr
    assert "boom in train_sft.py" in log.read_text()
    p, calls = fake()  # fixed: the stages before sft are complete and skipped
    assert p.returncode == 0 and calls[0] == "train_sft.py"


def test_training_stage_stopped_early_exits_3_and_the_rerun_resumes_it_in_place(fake, tmp_path):
    p, calls = fake(FAKE_STOP="train_pretrain.py")
    assert p.returncode == 3 and calls[-1] == "train_pretrain.py", p.stderr
    assert "stopped before its last step" in p.stderr
    marker = tmp_path / "run/pretrain/checkpoint_marker"
    marker.write_text("a checkpoint the rerun must keep")
    p, calls = fake()
    assert p.returncode == 0 and calls[0] == "train_pretrain.py"
    assert "interrupted before" in p.stdout and marker.is_file()


def test_unknown_stage_and_missing_config_dir_are_clear_errors(tmp_path):
    p = subprocess.run(["bash", str(RECIPE), str(ROOT / "launch/configs/debug"), str(tmp_path), "--only", "nope"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "no stage 'nope'" in p.stderr and "projector" in p.stderr
    p = subprocess.run(["bash", str(RECIPE), str(tmp_path / "missing")], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "does not exist" in p.stderr


CONFIG_CLASSES = {"base": ("data_prep.gguf_to_hf", "GGUFConfig"), "corpus": ("data_prep.build_corpus", "CorpusConfig"),
                  "micrographs": ("data_prep.synth_micrographs", "SynthConfig"),
                  "ingest": ("data_prep.ingest", "IngestConfig"), "annotate": ("data_prep.annotate", "AnnotateConfig"),
                  "instructions": ("data_prep.make_instructions", "InstructionsConfig"),
                  "pretrain": ("train_pretrain", "PretrainConfig"), "sft": ("train_sft", "SFTConfig"),
                  "dpo": ("train_sft", "SFTConfig"), "vision": ("train_vision", "VisionConfig"),
                  "projector": ("train_moe", "MoEConfig"), "llm": ("train_moe", "MoEConfig"),
                  "moe": ("train_moe", "MoEConfig"), "moe_dpo": ("train_moe", "MoEConfig"),
                  "moe_qlora": ("train_moe", "MoEConfig"),  # an alternative moe stage, run by its own command
                  "evaluate": ("evaluate", "EvalConfig"), "gptq": ("export_gptq", "ExportConfig")}


@pytest.mark.parametrize("path", sorted((ROOT / "launch/configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_yaml_is_a_stage_and_loads_into_its_script_config(path):
    import importlib

    from semivlm.config import load_config

    assert path.stem in CONFIG_CLASSES, f"{path}: launch/recipe.sh has no stage for '{path.stem}'"
    module, cls = CONFIG_CLASSES[path.stem]
    load_config(getattr(importlib.import_module(module), cls), ["--config", str(path)])
