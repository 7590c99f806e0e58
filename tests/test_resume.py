"""Resume on another world size or format, and training by epochs (issue 19, points 3 and 4).

The sample sequence is a function of (seed, epoch, global position) only and a resume keeps the global batch, so a
run checkpointed on N ranks and resumed on M sees the samples, the schedule and (through DeepSpeed's universal
checkpoint) the Adam state of the uninterrupted run. SEMIVLM_SAMPLE_LOG makes every rank log the records it trains on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, reset_accelerate, run_script

from semivlm import checkpoint as ckpt
from semivlm.config import load_config
from semivlm.loop import keep_global_batch
from train_pretrain import PretrainConfig, main

LAUNCH = [str(REPO / ".venv/bin/accelerate"), "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml"]


def run_in_process(args: list[str]) -> dict:
    reset_accelerate()
    return main(load_config(PretrainConfig, args))


def samples(log: Path) -> dict[int, list[int]]:
    """{step: sorted record ids trained on at that step, all ranks together} from SEMIVLM_SAMPLE_LOG files."""
    out: dict[int, list[int]] = {}
    for f in log.parent.glob(log.name + ".rank*"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], []).extend(row["ids"])
    return {s: sorted(ids) for s, ids in sorted(out.items())}


def per_step(history: list[dict], key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in history if key in h}


@pytest.fixture
def small_blocks(tiny_blocks, tmp_path) -> Path:
    """11 training blocks: an odd count, so that 2 epochs at a global batch of 4 end with a short step."""
    from datasets import load_from_disk

    path = tmp_path / "small"
    load_from_disk(str(tiny_blocks / "train")).select(range(11)).save_to_disk(str(path))
    return path


@pytest.mark.slow
def test_zero3_run_moved_from_two_ranks_to_one_and_back_sees_the_uninterrupted_samples_schedule_and_adam_state(
        pretrain_args, tmp_path, monkeypatch, tiny_model_dir):
    # global batch 4 throughout: 2 ranks × 2 micro × 1 accum, and 1 rank × 2 micro × 2 accum (grad_accum adjusted
    # from the checkpoint: the 1-rank leg is launched with the 2-rank command's grad_accum 1)
    common = {"max_steps": 6, "micro_batch_size": 2, "grad_accum": 1, "warmup_steps": 2, "eval_data": "",
              "weight_decay": 0.1, "init_from": tiny_model_dir, "model_config": "{}"}  # same start under ZeRO-3
    monkeypatch.setenv("SEMIVLM_SAMPLE_LOG", str(tmp_path / "straight.log"))
    straight = run_in_process(pretrain_args(tmp_path / "straight", **{**common, "grad_accum": 2}))
    monkeypatch.delenv("SEMIVLM_SAMPLE_LOG")

    moved = tmp_path / "moved"
    env = {"SEMIVLM_SAMPLE_LOG": str(tmp_path / "moved.log")}
    legs = [(LAUNCH, 2), (LAUNCH + ["--num_processes", "1"], 2), (LAUNCH, 0)]  # 2 ranks, then 1, then 2 again
    for launch, exit_after in legs:
        proc = run_script(launch + ["train_pretrain.py"] + pretrain_args(moved, **common, exit_after_steps=exit_after),
                          timeout=300, env_extra=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if launch is legs[1][0]:
            assert "grad_accum 1 -> 2 on 1 ranks" in proc.stdout, proc.stdout[-3000:]
            assert "resumed across world sizes (2 DeepSpeed rank(s) -> 1 DeepSpeed rank(s))" in proc.stdout
    assert "resumed across world sizes (1 DeepSpeed rank(s) -> 2 DeepSpeed rank(s))" in proc.stdout

    # the same records at every step, the same step count and lr schedule
    assert samples(tmp_path / "moved.log") == samples(tmp_path / "straight.log")
    assert sorted(samples(tmp_path / "moved.log")) == list(range(1, 7))
    history = json.loads((moved / "history.json").read_text())
    assert per_step(history, "lr") == pytest.approx(per_step(straight["history"], "lr"), rel=1e-12)
    # the same losses: weights and Adam moments crossed both moves (a restarted Adam takes a step of ~lr per weight,
    # which moves the loss of the following step by far more than this tolerance; so does DeepSpeed 0.19.8's shared
    # `step` tensor, which checkpoint._restore_hyperparameters undoes: 2e-4 at step 4 without it)
    a, b = per_step(straight["history"], "loss"), per_step(history, "loss")
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)


@pytest.mark.slow
def test_zero3_checkpoint_resumes_in_one_plain_process_with_its_adam_state(pretrain_args, tmp_path, tiny_model_dir):
    """The failure reported in issue 19: a 2-rank ZeRO-3 checkpoint rerun as `python train_pretrain.py`."""
    common = {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "warmup_steps": 1, "eval_data": "",
              "init_from": tiny_model_dir, "model_config": "{}"}
    straight = run_in_process(pretrain_args(tmp_path / "straight", **{**common, "grad_accum": 2}))
    proc = run_script(LAUNCH + ["train_pretrain.py"] + pretrain_args(tmp_path / "moved", **common, exit_after_steps=2),
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = run_in_process(pretrain_args(tmp_path / "moved", **common))
    assert resumed["max_steps"] == 4 and (tmp_path / "moved/final/model.safetensors").is_file()
    a, b = per_step(straight["history"], "loss"), per_step(resumed["history"], "loss")
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    assert per_step(resumed["history"], "lr") == pytest.approx(per_step(straight["history"], "lr"), rel=1e-12)


def zero2_fp32(tmp_path: Path) -> Path:
    """ds_configs/zero3_fp32.json at ZeRO stage 2 (the stage whose universal conversion is in question)."""
    config = json.loads((REPO / "ds_configs/zero3_fp32.json").read_text())
    config["zero_optimization"] = {"stage": 2, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    path = tmp_path / "zero2_fp32.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_plain_checkpoint_resumes_under_two_zero3_ranks_with_its_weights_and_schedule_and_a_restarted_optimizer(
        pretrain_args, tmp_path, tiny_model_dir):
    common = {"max_steps": 4, "micro_batch_size": 2, "warmup_steps": 1, "eval_data": "", "init_from": tiny_model_dir,
              "model_config": "{}"}
    straight = run_in_process(pretrain_args(tmp_path / "straight", **common, grad_accum=2))
    run_in_process(pretrain_args(tmp_path / "moved", **common, grad_accum=2, exit_after_steps=2))  # plain, 1 rank
    assert not ckpt.is_deepspeed_checkpoint(ckpt.find_latest_checkpoint(tmp_path / "moved"))
    proc = run_script(LAUNCH + ["train_pretrain.py"] + pretrain_args(tmp_path / "moved", **common, grad_accum=1),
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if "resumed across formats" in x)
    assert "(1 plain rank(s) -> 2 DeepSpeed rank(s))" in line and "the optimizer restarts" in line
    history = json.loads((tmp_path / "moved/history.json").read_text())
    a, b = per_step(straight["history"], "loss"), per_step(history, "loss")
    assert b[3] == pytest.approx(a[3], abs=1e-5)  # step 3's loss is taken on the checkpoint's weights
    assert abs(b[4] - a[4]) > 1e-5  # after one step of a fresh Adam the runs part, as the line says
    assert per_step(history, "lr") == pytest.approx(per_step(straight["history"], "lr"), rel=1e-12)


def test_plain_checkpoint_without_weights_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"checkpoint '.*' is corrupt: no model.safetensors") as e:
        ckpt.checkpoint_weights(tmp_path)
    assert "\n" not in str(e.value)


def test_a_global_batch_no_grad_accum_can_keep_is_refused_naming_what_would_work():
    saved = {"global_batch": 12, "world_size": 2, "micro_batch_size": 3, "grad_accum": 2}
    assert keep_global_batch(saved, 4, 3, 2, "ck") == 1  # 4 ranks × 3 micro × 1 accum
    assert keep_global_batch(saved, 1, 3, 2, "ck") == 4
    assert keep_global_batch({}, 5, 3, 2, None) == 2  # a fresh run keeps what it was given
    with pytest.raises(SystemExit, match=r"global batch of 12 samples .* 8 ranks × 3 micro .* "
                                         r"micro_batch_size in \[\] or a world size in \[1, 2, 4\]"):
        keep_global_batch(saved, 8, 3, 1, "ck")
    with pytest.raises(SystemExit, match=r"micro_batch_size in \[1, 2\] or a world size in \[1, 2, 4\]"):
        keep_global_batch(saved, 6, 3, 1, "ck")


def test_two_epochs_run_ceil_2n_over_g_steps_and_see_every_record_exactly_twice(pretrain_args, small_blocks,
                                                                                tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIVLM_SAMPLE_LOG", str(tmp_path / "epochs.log"))
    # 11 records, global batch 1 rank × 2 micro × 2 accum = 4: ceil(22 / 4) = 6 steps, the last with 2 records
    result = run_in_process(pretrain_args(tmp_path / "run", train_data=str(small_blocks), epochs=2, max_steps=0,
                                          micro_batch_size=2, grad_accum=2, warmup_steps=1, eval_data=""))
    assert result["max_steps"] == 6 and not result["stopped_early"]
    seen = samples(tmp_path / "epochs.log")
    assert sorted(seen) == list(range(1, 7)) and [len(ids) for ids in seen.values()] == [4, 4, 4, 4, 4, 2]
    order = [i for step in sorted(seen) for i in json.loads(
        (tmp_path / "epochs.log.rank0").read_text().splitlines()[step - 1])["ids"]]
    assert sorted(order[:11]) == list(range(11)) and sorted(order[11:]) == list(range(11))  # two permutations
    lrs = per_step(result["history"], "lr")
    assert sorted(lrs) == list(range(1, 7)) and lrs[6] < lrs[2]  # the cosine runs over the 6 steps
    assert json.loads((tmp_path / "run/run_config.json").read_text())["epochs"] == 2


def test_epochs_and_max_steps_together_are_refused_naming_both(pretrain_args, tmp_path):
    with pytest.raises(SystemExit, match=r"set max_steps or epochs, not both \(max_steps 8, epochs 2"):
        run_in_process(pretrain_args(tmp_path / "run", epochs=2))


@pytest.mark.slow
def test_zero2_checkpoint_of_two_ranks_resumes_in_one_plain_process_with_adam_or_says_it_restarts_the_optimizer(
        pretrain_args, tmp_path, tiny_model_dir, monkeypatch, capsys):
    common = {"max_steps": 4, "micro_batch_size": 2, "warmup_steps": 1, "eval_data": "", "init_from": tiny_model_dir,
              "model_config": "{}"}
    straight_history = run_in_process(pretrain_args(tmp_path / "straight", **common, grad_accum=2))["history"]
    straight = per_step(straight_history, "loss")
    launch = LAUNCH + ["--deepspeed_config_file", str(zero2_fp32(tmp_path))]
    proc = run_script(launch + ["train_pretrain.py"] + pretrain_args(tmp_path / "moved", **common, grad_accum=1,
                                                                     exit_after_steps=2), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(ZeRO stage 2)" in proc.stdout
    shutil.copytree(tmp_path / "moved", tmp_path / "unconvertible")
    capsys.readouterr()

    # DeepSpeed 0.19.8 converts ZeRO-2 once the missing universal_checkpoint_info is injected: Adam crosses
    moved = per_step(run_in_process(pretrain_args(tmp_path / "moved", **common, grad_accum=2))["history"], "loss")
    assert "resumed across world sizes (2 DeepSpeed rank(s) -> 1 plain rank(s)): weights, Adam moments" in \
        capsys.readouterr().out
    for step in (3, 4):
        assert moved[step] == pytest.approx(straight[step], abs=1e-5), (step, straight, moved)

    # where the conversion fails: one line, the checkpoint's weights and schedule, a fresh optimizer
    def fail(*_, **__):
        raise AssertionError("Required universal_checkpoint_info state is missing in checkpoint.\nmore")
    monkeypatch.setattr(ckpt, "universal_checkpoint", fail)
    history = run_in_process(pretrain_args(tmp_path / "unconvertible", **common, grad_accum=2))["history"]
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "without the Adam state" in x)
    assert "DeepSpeed could not convert" in line and "(AssertionError: Required universal_checkpoint_info" in line
    assert line.endswith("the optimizer restarts") and "more" not in line
    restarted = per_step(history, "loss")
    assert restarted[3] == pytest.approx(straight[3], abs=1e-5)  # taken on the checkpoint's weights
    assert abs(restarted[4] - straight[4]) > 1e-5  # a fresh Adam's first step, as the line says
    assert per_step(history, "lr") == pytest.approx(per_step(straight_history, "lr"), rel=1e-12)
