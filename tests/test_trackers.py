"""report_to: the loop's scalars reach TensorBoard, MLflow's file store and W&B (offline) through Accelerate's
trackers, with the steps of the log line; bad tracker names are config errors naming the field."""
from __future__ import annotations

import json

import pytest
from conftest import reset_accelerate

import train_pretrain
from semivlm import loop, moe
from semivlm.config import load_config

STEP_KEYS = ("loss", "lr", "tokens_per_s", "mfu", "peak_mem_gib")
ROUTING = {"routing/layer1/text/expert0": 0.25, "routing/layer1/text/expert1": 0.75, "routing/layer1/aux_loss": 1.5}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(args: list[str]) -> dict:
    reset_accelerate()
    return train_pretrain.main(load_config(train_pretrain.PretrainConfig, args))


def by_step(history: list[dict], key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in history if key in h}


def test_tensorboard_and_mlflow_get_the_log_line_scalars_eval_metrics_and_save_scalars(pretrain_args, tmp_path,
                                                                                      monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the loop sets; here undone after the test
    # the scalars an `artifacts()` callback returns at a save (train_moe: routing shares) take the same path
    real_train = train_pretrain.train
    monkeypatch.setattr(train_pretrain, "train",
                        lambda *a, **kw: real_train(*a, **kw, artifacts=lambda: ({"routing.json": "{}\n"}, ROUTING)))
    out = tmp_path / "run"
    result = run(pretrain_args(out, max_steps=4, eval_every=2, save_every=3, report_to="[tensorboard, mlflow]"))
    history = result["history"]
    expected = {key: by_step(history, key) for key in (*STEP_KEYS, "eval_loss", "eval_ppl", *ROUTING)}
    assert list(expected["loss"]) == [1, 2, 3, 4] and list(expected["eval_loss"]) == [0, 2, 4]
    assert list(expected["routing/layer1/text/expert1"]) == [3, 4]  # the checkpoint at 3, the export at 4

    events = EventAccumulator(str(out / "tensorboard" / "semivlm"), size_guidance={"scalars": 0})
    events.Reload()
    for key, want in expected.items():
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == pytest.approx(want, rel=1e-6), key  # TensorBoard stores float32

    client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("semivlm")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FINISHED"
    # the config as flat parameters: lists and mappings as JSON text
    assert mlrun.data.params["max_steps"] == "4"
    assert json.loads(mlrun.data.params["report_to"]) == ["tensorboard", "mlflow"]
    assert json.loads(mlrun.data.params["model_config"])["hidden_size"] == 64
    for key, want in expected.items():
        got = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
        assert got == pytest.approx(want, rel=1e-12), key


def test_wandb_without_credentials_writes_an_offline_run_under_output_dir(pretrain_args, tmp_path, monkeypatch,
                                                                        capsys):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` either
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    run(pretrain_args(out, max_steps=2, report_to="wandb"))
    assert f"wandb -> {out}/wandb (offline)" in capsys.readouterr().out
    wandb.teardown()  # finish() returns before wandb's service has written the run file; this waits for it
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    assert all(key.encode() in data for key in (*STEP_KEYS, "eval_loss"))


def test_report_to_names_are_checked_against_the_trackers_and_their_packages(monkeypatch):
    assert loop.report_to_trackers("none") == []
    assert loop.report_to_trackers(["tensorboard", "none", "tensorboard"]) == ["tensorboard"]
    assert loop.report_to_trackers("tensorboard,mlflow") == ["tensorboard", "mlflow"]
    with pytest.raises(SystemExit, match=r"config error: report_to: unknown tracker 'tensorbord'"):
        loop.report_to_trackers(["tensorbord"])
    monkeypatch.setitem(loop.TRACKERS, "mlflow", ("no_such_module_semivlm", "mlflow-skinny==3.18.0"))
    with pytest.raises(SystemExit, match=r"report_to: mlflow needs .*pip install mlflow-skinny==3\.18\.0"):
        loop.report_to_trackers("mlflow")


def test_a_bad_tracker_name_stops_the_script_before_training(pretrain_args, tmp_path):
    with pytest.raises(SystemExit, match=r"report_to: unknown tracker 'tensorbord'"):
        run(pretrain_args(tmp_path / "bad", report_to="tensorbord"))
    assert not (tmp_path / "bad").exists()


def test_the_old_tensorboard_flag_is_an_unknown_key_naming_it():
    with pytest.raises(SystemExit, match=r"unknown key 'tensorboard'"):
        load_config(train_pretrain.PretrainConfig, ["--tensorboard", "true"])


def test_routing_scalars_flatten_a_probe_summary_per_layer_modality_and_expert():
    summary = {"num_experts": 2, "top_k": 1, "aux_loss_mean": 1.1, "layers": [
        {"layer": 1, "image": [0.6, 0.4], "text": [0.1, 0.9], "all": [0.2, 0.8], "aux_loss_mean": 1.2},
        {"layer": 3, "image": None, "text": [0.5, 0.5], "all": [0.5, 0.5], "aux_loss_mean": 1.0}]}
    assert moe.routing_scalars(summary) == {
        "routing/layer1/image/expert0": 0.6, "routing/layer1/image/expert1": 0.4,
        "routing/layer1/text/expert0": 0.1, "routing/layer1/text/expert1": 0.9, "routing/layer1/aux_loss": 1.2,
        "routing/layer3/text/expert0": 0.5, "routing/layer3/text/expert1": 0.5, "routing/layer3/aux_loss": 1.0}
