"""Launch files: DeepSpeed configs, accelerate configs, the SLURM job script (run under fake srun/scontrol/
accelerate) and the real pretraining recipe. Fast: no training, no GPU, no network."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import fake_slurm as fake_slurm_bin
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "ds_configs"
ACC_DIR = ROOT / "launch" / "accelerate"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
RECIPE = ROOT / "launch" / "configs" / "semikong_8b" / "pretrain.yaml"

DS_FILES = {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3, "zero3_fp32.json": 3}
ACC_FILES = ["single_gpu.yaml", "cpu_2proc.yaml", "node_8gpu_zero3.yaml", "multinode_zero3.yaml"]


# ---------------------------------------------------------------------------------------------- ds_configs

def load_ds(name: str) -> dict:
    return json.loads((DS_DIR / name).read_text())


def test_ds_config_set_is_complete():
    assert set(DS_FILES) <= {p.name for p in DS_DIR.glob("*.json")}
    assert (DS_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", sorted(DS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_ds_config_sets_precision_and_clipping_explicitly(path):
    """Any ds config (also ones added later): the scripts read these keys without DeepSpeed too."""
    cfg = json.loads(path.read_text())
    assert "optimizer" not in cfg and "scheduler" not in cfg, "the training loop owns optimizer and scheduler"
    assert isinstance(cfg["gradient_clipping"], (int, float)) and cfg["gradient_clipping"] > 0
    assert isinstance(cfg["bf16"]["enabled"], bool)
    assert isinstance(cfg.get("fp16", {"enabled": False})["enabled"], bool)
    assert cfg["zero_optimization"]["stage"] in (0, 1, 2, 3)


@pytest.mark.parametrize("name", sorted(DS_FILES))
def test_ds_config_keys(name):
    cfg = load_ds(name)
    assert "optimizer" not in cfg and "scheduler" not in cfg, "the training loop owns optimizer and scheduler"
    # read by the scripts without DeepSpeed too, so explicit values, never "auto"
    assert isinstance(cfg["gradient_clipping"], float) and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is (name != "zero3_fp32.json")
    assert cfg.get("fp16", {"enabled": False})["enabled"] is False
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert cfg[key] == "auto", key
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["wall_clock_breakdown"] is False
    assert cfg["steps_per_print"] >= 10**6
    zero = cfg["zero_optimization"]
    assert zero["stage"] == DS_FILES[name]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == "auto"
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == "auto"
        assert zero["stage3_param_persistence_threshold"] == "auto"
        assert isinstance(zero["stage3_max_live_parameters"], int)
        assert isinstance(zero["stage3_max_reuse_distance"], int)
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offloaded = name == "zero3_offload.json"
    for part in ("offload_optimizer", "offload_param"):
        if offloaded:
            assert zero[part] == {"device": "cpu", "pin_memory": True}
        else:
            assert part not in zero
    if offloaded:  # the loop passes a torch AdamW; DeepSpeed refuses it with offload unless told otherwise
        assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_ds_configs_accepted_by_deepspeed():
    """DeepSpeed's own config parser accepts every file once accelerate has filled the "auto" values."""
    import deepspeed.runtime.config as ds_config

    class OneRank:
        def get_data_parallel_world_size(self):
            return 1

        def get_model_parallel_world_size(self):
            return 1

        def get_data_parallel_group(self):
            return None

    for name, stage in DS_FILES.items():
        cfg = load_ds(name)
        cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=16, train_batch_size=64)
        zero = cfg["zero_optimization"]
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            if zero.get(key) == "auto":
                zero[key] = 4096 * 4096
        parsed = ds_config.DeepSpeedConfig(cfg, mpu=OneRank())
        assert parsed.zero_config.stage == stage, name
        assert parsed.gradient_clipping == 1.0, name


# ---------------------------------------------------------------------------------------------- accelerate

def load_acc(name: str) -> dict:
    return yaml.safe_load((ACC_DIR / name).read_text())


def test_accelerate_config_set_is_complete():
    assert set(ACC_FILES) <= {p.name for p in ACC_DIR.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted({*ACC_FILES, *(p.name for p in ACC_DIR.glob("*.yaml"))}))
def test_accelerate_config(name):
    cfg = load_acc(name)
    assert "mixed_precision" not in cfg, "precision comes from ds_configs/ only"
    if cfg["distributed_type"] == "DEEPSPEED":
        ds_file = cfg["deepspeed_config"]["deepspeed_config_file"]
        assert (ROOT / ds_file).is_file(), ds_file
        assert cfg["deepspeed_config"]["zero3_init_flag"] is (load_ds(Path(ds_file).name)["zero_optimization"]
                                                              ["stage"] == 3)
    else:
        assert cfg["distributed_type"] == "NO" and cfg["num_processes"] == 1
    # accelerate itself accepts the file (unknown keys are an error there)
    import accelerate.commands.config.config_args as config_args
    loaded = config_args.load_config_from_file(str(ACC_DIR / name))
    assert loaded.num_processes == cfg["num_processes"]


def test_accelerate_specific_settings():
    cpu = load_acc("cpu_2proc.yaml")
    assert cpu["num_processes"] == 2 and cpu["use_cpu"] is True and cpu["num_machines"] == 1
    assert cpu["deepspeed_config"]["deepspeed_config_file"] == "ds_configs/zero3_fp32.json"
    assert cpu["rdzv_backend"] == "static" and cpu["same_network"] is True
    assert load_acc("node_8gpu_zero3.yaml")["num_processes"] == 8
    assert load_acc("node_8gpu_zero3.yaml")["deepspeed_config"]["deepspeed_config_file"] == "ds_configs/zero3.json"
    multi = load_acc("multinode_zero3.yaml")
    assert multi["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    assert multi["deepspeed_config"]["deepspeed_config_file"] == "ds_configs/zero3.json"


# ---------------------------------------------------------------------------------------------- shell scripts

def shell_scripts() -> list[Path]:
    launch = ROOT / "launch"
    return sorted([*launch.rglob("*.sbatch"), *launch.rglob("*.sh")])


def test_shell_scripts_parse():
    scripts = shell_scripts()
    assert SBATCH in scripts
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_sbatch_header():
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    text = "\n".join(header)
    for flag in ("--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=", "--requeue",
                 "--signal=B:USR1@300", "--open-mode=append", "--output=logs/%x-%j.out"):
        assert flag in text, flag


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_slurm_bin.install(bin_dir)
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "train_fake.py"  # the sbatch script checks that SCRIPT exists; the fake never runs it
    script.write_text("raise SystemExit('not run')\n")
    out = tmp_path / "run"

    def env(mode: str) -> dict:
        e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        e.update(PATH=f"{bin_dir}{os.pathsep}{e['PATH']}", FAKE_LOG=str(log), FAKE_MODE=mode,
                 FAKE_HOSTNAMES="gpu-a01 gpu-a02", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
                 SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="16")
        return e

    def cmd(*extra: str) -> list[str]:
        return ["bash", str(SBATCH), str(script), str(RECIPE.relative_to(ROOT)), "--output_dir", str(out),
                "--max_steps", "7", *extra]

    def run(mode: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd(*extra), cwd=ROOT, env=env(mode), capture_output=True, text=True, timeout=60)

    def calls(kind: str | None = None) -> list[dict]:
        return fake_slurm_bin.read_calls(log, kind)

    return type("FakeSlurm", (), dict(run=staticmethod(run), calls=staticmethod(calls), cmd=staticmethod(cmd),
                                      env=staticmethod(env), out=out, script=script))


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def requeues(fake) -> list[list[str]]:
    return [c["argv"] for c in fake.calls("scontrol") if c["argv"][:1] == ["requeue"]]


def test_sbatch_launches_one_accelerate_per_node(fake_slurm):
    proc = fake_slurm.run("finish", "--learning_rate", "5e-5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = fake_slurm.calls("accelerate")
    assert len(launches) == 2
    assert [c["SLURM_NODEID"] for c in launches] == ["0", "1"]
    for node, call in enumerate(launches):
        argv = call["argv"]
        assert argv[0] == "launch"
        assert opt(argv, "--config_file") == "launch/accelerate/multinode_zero3.yaml"
        assert (ROOT / opt(argv, "--config_file")).is_file()
        assert opt(argv, "--machine_rank") == str(node)
        assert opt(argv, "--main_process_ip") == "gpu-a01"
        assert opt(argv, "--num_processes") == "16"
        assert opt(argv, "--num_machines") == "2"
        assert opt(argv, "--deepspeed_multinode_launcher") == "standard"
        port = int(opt(argv, "--main_process_port"))
        assert 1024 < port < 65536
        # the training script, its config and the extra args come last, unchanged
        tail = argv[argv.index(str(fake_slurm.script)):]
        assert tail == [str(fake_slurm.script), "--config", "launch/configs/semikong_8b/pretrain.yaml",
                        "--output_dir", str(fake_slurm.out), "--max_steps", "7", "--learning_rate", "5e-5"]
    assert len({opt(c["argv"], "--main_process_port") for c in launches}) == 1
    assert len(fake_slurm.calls("srun")) == 1
    assert not requeues(fake_slurm)
    assert str(fake_slurm.out) in proc.stdout  # the output dir is printed


@pytest.mark.parametrize("script", ["train.sbatch", "srun_accelerate.sh"])
@pytest.mark.parametrize("job_id", [12768, 39999, 59998, 4242, 1])
def test_rendezvous_port_stays_below_the_ephemeral_range(fake_slurm, script, job_id):
    # 20000 + id % 20000 gave 32768..39999 for a third of the ids: Linux hands those out to outgoing connections
    env = {**fake_slurm.env("finish"), "SLURM_JOB_ID": str(job_id)}
    cmd = fake_slurm.cmd() if script == "train.sbatch" else [
        "bash", str(ROOT / "launch/slurm/srun_accelerate.sh"), str(fake_slurm.script), "--output_dir", str(fake_slurm.out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ports = {int(opt(c["argv"], "--main_process_port")) for c in fake_slurm.calls("accelerate")}
    assert len(ports) == 1
    port = ports.pop()
    assert 1024 <= port < 32768, port
    assert port == 15000 + job_id % 15000


def test_nccl_diagnostics_reach_every_rank(fake_slurm):
    env = {**fake_slurm.env("finish"), "NCCL_IB_HCA": "mlx5_0"}  # a site's own setting travels unchanged
    env.pop("NCCL_DEBUG", None)
    proc = subprocess.run(fake_slurm.cmd(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = fake_slurm.calls("accelerate")
    assert len(launches) == 2
    for call in launches:
        nccl = call["nccl"]
        assert nccl["NCCL_DEBUG"] == "WARN" and nccl["NCCL_IB_HCA"] == "mlx5_0", nccl
        assert nccl["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and nccl["NCCL_ASYNC_ERROR_HANDLING"] == "1", nccl
    assert "NCCL_DEBUG=WARN" in proc.stdout  # and the job log says what was set
    env["NCCL_DEBUG"] = "INFO"  # the user's choice wins
    subprocess.run(fake_slurm.cmd(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert fake_slurm.calls("accelerate")[-1]["nccl"]["NCCL_DEBUG"] == "INFO"


def test_sbatch_uses_the_project_venv_when_accelerate_is_not_on_path(fake_slurm, tmp_path):
    project = tmp_path / "project"
    (project / ".venv/bin").mkdir(parents=True)
    fake_slurm_bin.write_exe(project / ".venv/bin/accelerate", fake_slurm_bin.FAKE_ACCELERATE)
    bin_dir = tmp_path / "bin_no_accelerate"
    bin_dir.mkdir()
    fake_slurm_bin.install(bin_dir)
    (bin_dir / "accelerate").unlink()
    env = {**fake_slurm.env("finish"), "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
           "SLURM_SUBMIT_DIR": str(project)}
    cmd = fake_slurm.cmd()
    cmd[3] = str(RECIPE)  # the config by absolute path: the job runs in the project directory
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = fake_slurm.calls("accelerate")
    assert len(launches) == 2 and {c["exe"] for c in launches} == {str(project / ".venv/bin/accelerate")}
    (project / ".venv/bin/accelerate").unlink()  # neither on PATH nor in .venv: a one-line error, no srun
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no 'accelerate' on PATH and no .venv/bin/accelerate" in proc.stderr
    assert len(fake_slurm.calls("srun")) == 1


def test_sbatch_requeues_a_stopped_run(fake_slurm):
    proc = fake_slurm.run("stop")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert requeues(fake_slurm) == [["requeue", "4242"]]
    assert not (fake_slurm.out / "final").exists()


def test_sbatch_usr1_creates_stop_and_requeues(fake_slurm):
    """The real signal path: USR1 to the batch shell while srun runs -> STOP file -> loop exits 0 -> requeue."""
    proc = subprocess.Popen(fake_slurm.cmd(), cwd=ROOT, env=fake_slurm.env("wait_stop"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while not (fake_slurm.out / "started").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline, "fake accelerate never started"
            time.sleep(0.05)
        assert not (fake_slurm.out / "STOP").exists()
        os.kill(proc.pid, signal.SIGUSR1)  # only the batch shell, like --signal=B:USR1
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert (fake_slurm.out / "STOP").exists()
    assert [c["SLURM_NODEID"] for c in fake_slurm.calls("accelerate")] == ["0", "1"]
    assert requeues(fake_slurm) == [["requeue", "4242"]]
    assert "USR1" in output


def test_sbatch_does_not_requeue_a_finished_run(fake_slurm):
    proc = fake_slurm.run("finish")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (fake_slurm.out / "final" / "config.json").is_file()
    assert not requeues(fake_slurm)


def test_sbatch_finished_run_wins_over_a_stale_stop(fake_slurm):
    fake_slurm.out.mkdir(parents=True)
    (fake_slurm.out / "STOP").touch()
    proc = fake_slurm.run("finish")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not requeues(fake_slurm)


def test_sbatch_propagates_failure_without_requeue(fake_slurm):
    fake_slurm.out.mkdir(parents=True)
    (fake_slurm.out / "STOP").touch()  # even a stop request does not requeue a failed run
    proc = fake_slurm.run("fail")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert len(fake_slurm.calls("accelerate")) == 2
    assert not requeues(fake_slurm)


def test_sbatch_reads_output_dir_from_config(fake_slurm, tmp_path):
    """Without --output_dir the STOP file and final/ are looked for in the config's output_dir."""
    out = tmp_path / "from_config"
    config = tmp_path / "cfg.yaml"
    config.write_text(f"# a comment\nmax_steps: 3\noutput_dir: '{out}'   # trailing comment\n")
    env = dict(fake_slurm.env("stop"), FAKE_OUT=str(out))
    proc = subprocess.run(["bash", str(SBATCH), str(fake_slurm.script), str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"output_dir {out}" in proc.stdout
    assert (out / "STOP").exists() and requeues(fake_slurm) == [["requeue", "4242"]]
    # --output_dir=X in the extra args wins over the config
    other = tmp_path / "from_cli"
    env["FAKE_MODE"] = "finish"
    proc = subprocess.run(["bash", str(SBATCH), str(fake_slurm.script), str(config), f"--output_dir={other}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"output_dir {other}" in proc.stdout and (other / "final" / "config.json").is_file()
    assert len(requeues(fake_slurm)) == 1


def test_sbatch_output_dir_without_python_yaml(fake_slurm, tmp_path):
    """The sed fallback reads output_dir when python3 has no yaml module."""
    out = tmp_path / "sed_out"
    config = tmp_path / "cfg.yaml"
    config.write_text(f'seed: 1\noutput_dir: "{out}"  # comment\n')
    shim = tmp_path / "noyaml"
    shim.mkdir()
    (shim / "python3").write_text("#!/bin/sh\nexit 1\n")
    (shim / "python3").chmod(0o755)
    env = fake_slurm.env("finish")
    env.update(PATH=f"{shim}{os.pathsep}{env['PATH']}", FAKE_OUT=str(out))
    proc = subprocess.run(["bash", str(SBATCH), str(fake_slurm.script), str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"output_dir {out}\n" in proc.stdout


def test_sbatch_usage_errors(fake_slurm):
    env = fake_slurm.env("finish")
    proc = subprocess.run(["bash", str(SBATCH), "train_pretrain.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run(["bash", str(SBATCH), "no_such_script.py", str(RECIPE)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no_such_script.py" in proc.stderr
    assert not fake_slurm.calls("accelerate")


# ---------------------------------------------------------------------------------------------- recipe

def test_recipe_config_keys_and_values():
    text = RECIPE.read_text()
    cfg = yaml.safe_load(text)
    from train_pretrain import PretrainConfig  # the script does no work at import

    known = {f.name for f in dataclasses.fields(PretrainConfig)}  # TrainConfig's fields + the LoRA ones
    unknown = set(cfg) - known
    assert not unknown, f"keys train_pretrain.py does not know: {sorted(unknown)}"
    assert cfg["init_from"] == cfg["tokenizer"] == "meta-llama/Llama-3.1-8B"
    assert cfg["ds_config"] == "ds_configs/zero3.json" and (ROOT / cfg["ds_config"]).is_file()
    assert cfg["gradient_checkpointing"] is True and cfg["attn_implementation"] == "sdpa"
    assert cfg["output_dir"] == "runs/semikong_8b/pretrain"
    assert cfg["train_data"] == "runs/semikong_8b/corpus/train"
    assert cfg["eval_data"] == "runs/semikong_8b/corpus/validation"
    assert 2e-5 <= cfg["learning_rate"] <= 1e-4 and cfg["warmup_steps"] > 0 and cfg["min_lr_ratio"] == 0.1
    # the batch arithmetic stated in the header matches the values
    tokens_per_step = 8 * cfg["micro_batch_size"] * cfg["grad_accum"] * 4096
    assert tokens_per_step == 2_097_152 and f"{8} GPUs × {cfg['micro_batch_size']} micro × {cfg['grad_accum']} " \
                                            f"accum × 4096 tokens" in text
    assert "block_size 4096" in text and "build_corpus.py" in text
    assert "sbatch" in text and "accelerate launch" in text


def test_recipe_config_loads_into_the_training_config():
    """The real config mechanism accepts the recipe."""
    from semivlm.config import load_config
    from train_pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, ["--config", str(RECIPE)])
    assert cfg.max_steps > 0 and cfg.ds_config == "ds_configs/zero3.json"
