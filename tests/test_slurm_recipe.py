"""The SLURM recipe chain: launch/slurm/submit_recipe.sh (one dependent job per stage of launch/recipe.sh) and
launch/slurm/recipe_stage.sbatch + srun_accelerate.sh (one stage per job, multi-node training, requeue), run under
fake sbatch/srun/scontrol/accelerate/python executables. Fast: no training, no GPU, no SLURM."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import fake_slurm
import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "launch" / "slurm"
SUBMIT = SLURM / "submit_recipe.sh"
STAGE_SBATCH = SLURM / "recipe_stage.sbatch"
SRUN_ACCELERATE = SLURM / "srun_accelerate.sh"
RECIPE = ROOT / "launch" / "recipe.sh"
CFG = "launch/configs/debug"
DEBUG_TRAINING = ["pretrain", "sft", "dpo", "vision", "projector", "llm", "moe", "moe_dpo"]
TRAIN_RE = re.compile(r"(^|/)train_\w*\.py$")


def test_scripts_parse():
    for script in (SUBMIT, STAGE_SBATCH, SRUN_ACCELERATE):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    # recipe.sh executes TRAIN_LAUNCHER directly; the submit script is run by hand
    for script in (SRUN_ACCELERATE, SUBMIT):
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


def test_stage_sbatch_header():
    header = "\n".join(line for line in STAGE_SBATCH.read_text().splitlines() if line.startswith("#SBATCH"))
    for flag in ("--ntasks-per-node=1", "--requeue", "--signal=B:USR1@300", "--open-mode=append", "--time="):
        assert flag in header, flag
    assert "--gpus" not in header, "GPUs are per stage (submit_recipe.sh): data prep and the report need none"


# ---------------------------------------------------------------------------------------------- fakes

# sbatch: logs its argv, prints the next job id (FAKE_SBATCH_FAIL_AT: the call number that fails)
FAKE_SBATCH = """#!{python}
import json, os, sys
log = os.environ["FAKE_LOG"]
n = sum(1 for line in open(log) if '"sbatch"' in line) if os.path.exists(log) else 0
with open(log, "a") as f:
    f.write(json.dumps({{"cmd": "sbatch", "argv": sys.argv[1:]}}) + "\\n")
if os.environ.get("FAKE_SBATCH_FAIL_AT") == str(n + 1):
    print("sbatch: error: Batch job submission failed: Invalid account", file=sys.stderr)
    sys.exit(1)
print(f"{{1001 + n}}{{os.environ.get('FAKE_SBATCH_SUFFIX', '')}}")
"""
# PYTHON for the non-training stages: logs, creates its --out / --output_dir; FAKE_MODE=wait_release waits for
# FAKE_RELEASE to exist first
FAKE_PYTHON = """#!{python}
import json, os, sys, time
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": "python", "argv": argv}}) + "\\n")
if os.environ.get("FAKE_MODE") == "wait_release":
    Path(os.environ["FAKE_RELEASE"] + ".started").touch()
    deadline = time.time() + 20
    while not os.path.exists(os.environ["FAKE_RELEASE"]):
        if time.time() > deadline:
            sys.exit(9)
        time.sleep(0.05)
for flag in ("--out", "--output_dir"):
    if flag in argv:
        Path(argv[argv.index(flag) + 1]).mkdir(parents=True, exist_ok=True)
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_slurm.install(bin_dir, {"sbatch": FAKE_SBATCH, "python": FAKE_PYTHON})
    log = tmp_path / "calls.jsonl"
    run_dir = tmp_path / "run"

    def env(mode: str = "finish", **extra: str) -> dict:
        e = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("TRAIN_LAUNCHER", "ACCELERATE_CONFIG", "MAIN_PROCESS_PORT")}
        e.update(PATH=f"{bin_dir}{os.pathsep}{e['PATH']}", FAKE_LOG=str(log), FAKE_MODE=mode,
                 PYTHON=str(bin_dir / "python"), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]",
                 SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=str(ROOT))
        e.update(extra)
        return e

    def calls(kind: str | None = None) -> list[dict]:
        return fake_slurm.read_calls(log, kind)

    def stage(name: str, mode: str = "finish", **extra: str) -> subprocess.CompletedProcess:
        # run from elsewhere: the job must cd to SLURM_SUBMIT_DIR like under SLURM
        return subprocess.run(["bash", str(STAGE_SBATCH), CFG, str(run_dir), name], cwd=tmp_path,
                              env=env(mode, **extra), capture_output=True, text=True, timeout=60)

    def submit(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SUBMIT), CFG, str(run_dir), *args], cwd=ROOT, env=env(**extra),
                              capture_output=True, text=True, timeout=60)

    return type("Fake", (), dict(env=staticmethod(env), calls=staticmethod(calls), stage=staticmethod(stage),
                                 submit=staticmethod(submit), run_dir=run_dir, bin=bin_dir, tmp=tmp_path))


def stage_list(run_dir: Path, env: dict | None = None) -> list[tuple[str, str, list[str]]]:
    """(name, output, command words) per stage of the debug recipe, from recipe.sh --list."""
    proc = subprocess.run(["bash", str(RECIPE), CFG, str(run_dir), "--list"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = []
    for line in proc.stdout.splitlines():
        name, out, cmd = line.split(None, 2)
        rows.append((name, out, shlex.split(cmd)))
    return rows


def is_training(words: list[str]) -> bool:
    return any(TRAIN_RE.search(w) for w in words)


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def sbatch_opts(argv: list[str]) -> dict[str, str]:
    """--key=value options before the job script."""
    script = argv.index("launch/slurm/recipe_stage.sbatch")
    return dict(a[2:].split("=", 1) for a in argv[:script] if a.startswith("--") and "=" in a)


# ---------------------------------------------------------------------------------------------- submit_recipe.sh

def test_submit_chains_one_job_per_stage(fake):
    stages = stage_list(fake.run_dir, fake.env())
    assert [s for s, _, words in stages if is_training(words)] == DEBUG_TRAINING
    proc = fake.submit("--nodes", "2", "--gpus_per_node", "4", "--", "--partition=gpu", "--account=abc")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = [c["argv"] for c in fake.calls("sbatch")]
    assert len(jobs) == len(stages)
    ids = [str(1001 + i) for i in range(len(stages))]
    for i, (argv, (name, _, words)) in enumerate(zip(jobs, stages)):
        o = sbatch_opts(argv)
        assert "--parsable" in argv
        # the job script and its arguments come last
        assert argv[-4:] == ["launch/slurm/recipe_stage.sbatch", CFG, str(fake.run_dir), name]
        assert o["job-name"] == f"semivlm-{name}"
        assert o["output"] == f"{fake.run_dir}/logs/slurm-{name}-%j.out"
        if i == 0:
            assert "dependency" not in o
        else:
            assert o["dependency"] == f"afterok:{ids[i - 1]}"
            assert o["kill-on-invalid-dep"] == "yes"
        if is_training(words):
            assert (o["nodes"], o["gpus-per-node"], o["cpus-per-task"]) == ("2", "4", "32"), name
        elif name.startswith("eval_") or name == "gptq":
            assert (o["nodes"], o["gpus-per-node"]) == ("1", "1"), name
        else:  # data preparation and the report
            assert name in ("corpus", "micrographs", "annotations", "instructions", "report"), name
            assert o["nodes"] == "1" and "gpus-per-node" not in o, name
        # the extra sbatch args reach every job, after ours (so they override)
        assert o["partition"] == "gpu" and o["account"] == "abc"
        assert argv.index("--partition=gpu") > argv.index(f"--nodes={o['nodes']}")
    assert (fake.run_dir / "logs").is_dir()  # SLURM does not create the directory of --output
    assert f"scancel {' '.join(ids)}" in proc.stdout
    for name, job in zip([s for s, _, _ in stages], ids):
        assert re.search(rf"^{name}\s+job {job}\b.*slurm-{name}-{job}\.out$", proc.stdout, re.M), name


def test_submit_from_a_stage(fake):
    stages = [s for s, _, _ in stage_list(fake.run_dir, fake.env())]
    proc = fake.submit("--from", "sft", "--nodes", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = [c["argv"] for c in fake.calls("sbatch")]
    assert [argv[-1] for argv in jobs] == stages[stages.index("sft"):]
    first = sbatch_opts(jobs[0])
    assert "dependency" not in first and first["nodes"] == "3" and first["gpus-per-node"] == "8"  # default G
    assert sbatch_opts(jobs[1])["dependency"] == "afterok:1001"
    assert f"scancel {' '.join(str(1001 + i) for i in range(len(jobs)))}" in proc.stdout


def test_submit_dry_run_submits_nothing(fake):
    stages = [s for s, _, _ in stage_list(fake.run_dir, fake.env())]
    proc = fake.submit("--dry_run", "--from", "moe", "--nodes", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not fake.calls("sbatch") and not fake.run_dir.exists()
    lines = [line for line in proc.stdout.splitlines() if "sbatch " in line]
    assert len(lines) == len(stages) - stages.index("moe")
    assert "--nodes=2" in lines[0] and "dependency" not in lines[0]
    assert "--dependency=afterok:$JOB_moe" in lines[1]
    # the printed commands are a script: run it with the fake sbatch and get the same chain
    script = fake.tmp / "chain.sh"
    script.write_text("set -e\n" + proc.stdout)
    replay = subprocess.run(["bash", str(script)], cwd=ROOT, env=fake.env(), capture_output=True, text=True,
                            timeout=60)
    assert replay.returncode == 0, replay.stderr
    jobs = [c["argv"] for c in fake.calls("sbatch")]
    assert [argv[-1] for argv in jobs] == stages[stages.index("moe"):]
    assert sbatch_opts(jobs[2])["dependency"] == "afterok:1002"


def test_submit_parses_cluster_suffix_and_stops_on_sbatch_failure(fake):
    proc = fake.submit(FAKE_SBATCH_SUFFIX=";cluster1", FAKE_SBATCH_FAIL_AT="3")
    assert proc.returncode == 1
    jobs = [c["argv"] for c in fake.calls("sbatch")]
    assert len(jobs) == 3 and sbatch_opts(jobs[1])["dependency"] == "afterok:1001"
    assert "stage 'annotations'" in proc.stderr and "scancel 1001 1002" in proc.stderr


def test_submit_gives_a_local_annotation_teacher_a_gpu(fake):
    cfg = fake.tmp / "cfg"
    cfg.mkdir()
    for name in ("micrographs", "projector"):
        (cfg / f"{name}.yaml").write_text((ROOT / CFG / f"{name}.yaml").read_text())
    (cfg / "annotate.yaml").write_text("teacher: transformers\nmodel: some/vlm\n")
    proc = subprocess.run(["bash", str(SUBMIT), str(cfg), str(fake.run_dir)], cwd=ROOT, env=fake.env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = {argv[-1]: sbatch_opts(argv) for argv in (c["argv"] for c in fake.calls("sbatch"))}
    assert list(jobs) == ["micrographs", "annotations", "projector"]
    assert "gpus-per-node" not in jobs["micrographs"]
    assert jobs["annotations"]["gpus-per-node"] == "1"
    assert jobs["projector"]["gpus-per-node"] == "8" and jobs["projector"]["nodes"] == "1"


def test_submit_usage_errors(fake):
    assert fake.submit("--from", "no_such_stage").returncode == 2
    assert fake.submit("--nodes", "0").returncode == 2
    assert fake.submit("--bogus").returncode == 2
    proc = subprocess.run(["bash", str(SUBMIT), "launch/configs/no_such_dir", str(fake.run_dir)], cwd=ROOT,
                          env=fake.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert not fake.calls("sbatch")


# ---------------------------------------------------------------------------------------------- recipe_stage.sbatch

def requeues(fake) -> list[list[str]]:
    return [c["argv"] for c in fake.calls("scontrol") if c["argv"][:1] == ["requeue"]]


def test_stage_training_runs_accelerate_on_every_node(fake):
    proc = fake.stage("pretrain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = fake.calls("accelerate")
    assert [c["SLURM_NODEID"] for c in launches] == ["0", "1"]
    job_env = fake.env(TRAIN_LAUNCHER="launch/slurm/srun_accelerate.sh")  # as recipe_stage.sbatch sets it
    words = dict((s, w) for s, _, w in stage_list(fake.run_dir, job_env))["pretrain"]
    assert words[0] == "launch/slurm/srun_accelerate.sh"  # recipe.sh's TRAIN_LAUNCHER in the job
    for node, call in enumerate(launches):
        argv = call["argv"]
        assert argv[0] == "launch"
        assert opt(argv, "--config_file") == "launch/accelerate/multinode_zero3.yaml"
        assert (ROOT / opt(argv, "--config_file")).is_file()
        assert opt(argv, "--machine_rank") == str(node)
        assert opt(argv, "--main_process_ip") == "node01"
        assert opt(argv, "--num_machines") == "2"
        assert opt(argv, "--num_processes") == "8"  # 2 nodes × SLURM_GPUS_ON_NODE=4
        assert opt(argv, "--main_process_port") == str(15000 + 4242 % 15000)
        assert opt(argv, "--deepspeed_multinode_launcher") == "standard"
        # then the stage's own command, unchanged: script, its YAML, its inputs and output
        tail = argv[argv.index("train_pretrain.py"):]
        assert tail == words[1:]
        assert opt(tail, "--config") == f"{CFG}/pretrain.yaml" and (ROOT / opt(tail, "--config")).is_file()
        assert opt(tail, "--output_dir") == f"{fake.run_dir}/pretrain"
    srun = fake.calls("srun")
    assert len(srun) == 1 and srun[0]["SRUN_CPUS_PER_TASK"] == "32"
    assert "--nodes=2" in srun[0]["argv"] and "--ntasks-per-node=1" in srun[0]["argv"]
    assert fake.calls("scontrol")[0]["argv"] == ["show", "hostnames", "node[01-02]"]
    assert not requeues(fake) and not fake.calls("python")
    assert (fake.run_dir / ".recipe" / "pretrain.done").is_file()
    # a rerun of the complete stage (e.g. the job requeued by SLURM after it finished) does not train again
    proc = fake.stage("pretrain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "complete, skipped" in proc.stdout and len(fake.calls("accelerate")) == 2


def test_stage_accelerate_config_override(fake):
    proc = fake.stage("sft", ACCELERATE_CONFIG="launch/accelerate/node_8gpu_zero3.yaml", SLURM_NNODES="1",
                      MAIN_PROCESS_PORT="29555")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [call] = fake.calls("accelerate")
    assert opt(call["argv"], "--config_file") == "launch/accelerate/node_8gpu_zero3.yaml"
    assert opt(call["argv"], "--num_processes") == "4" and opt(call["argv"], "--machine_rank") == "0"
    assert opt(call["argv"], "--main_process_port") == "29555"
    assert opt(call["argv"], "--init_from") == f"{fake.run_dir}/pretrain/final"


def test_stage_non_training_runs_python_without_srun(fake):
    proc = fake.stage("corpus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [call] = fake.calls("python")
    assert call["argv"][0] == "data_prep/build_corpus.py"
    assert opt(call["argv"], "--config") == f"{CFG}/corpus.yaml"
    assert not fake.calls("srun") and not fake.calls("accelerate") and not requeues(fake)
    assert (fake.run_dir / ".recipe" / "corpus.done").is_file()


def test_stage_stopped_training_is_requeued(fake):
    proc = fake.stage("pretrain", "stop")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert requeues(fake) == [["requeue", "4242"]]
    assert not (fake.run_dir / "pretrain" / "final").exists()
    assert not (fake.run_dir / ".recipe" / "pretrain.done").exists()
    # the requeued job resumes the same stage and finishes it
    proc = fake.stage("pretrain", "finish", SLURM_RESTART_COUNT="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interrupted before" in proc.stdout and "restart 1" in proc.stdout
    assert len(requeues(fake)) == 1 and (fake.run_dir / ".recipe" / "pretrain.done").is_file()


def test_stage_usr1_creates_stop_and_requeues(fake):
    """The real signal path: USR1 to the batch shell while training runs -> <output>/STOP -> recipe.sh exits 3 ->
    requeue."""
    out = fake.run_dir / "pretrain"
    proc = subprocess.Popen(["bash", str(STAGE_SBATCH), CFG, str(fake.run_dir), "pretrain"], cwd=fake.tmp,
                            env=fake.env("wait_stop"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while not (out / "started").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline, "fake accelerate never started"
            time.sleep(0.05)
        assert not (out / "STOP").exists()
        os.kill(proc.pid, signal.SIGUSR1)  # only the batch shell, like --signal=B:USR1
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert (out / "STOP").exists() and "USR1" in output
    assert [c["SLURM_NODEID"] for c in fake.calls("accelerate")] == ["0", "1"]
    assert requeues(fake) == [["requeue", "4242"]]


def test_stage_usr1_during_a_non_training_stage(fake):
    """No STOP file in a stage that cannot checkpoint (the report's output is a file); the stage runs on."""
    release = fake.tmp / "release"
    output_file = fake.tmp / "job.out"
    with open(output_file, "w") as sink:
        proc = subprocess.Popen(["bash", str(STAGE_SBATCH), CFG, str(fake.run_dir), "report"], cwd=fake.tmp,
                                env=fake.env("wait_release", FAKE_RELEASE=str(release)), stdout=sink,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 30
            while not Path(f"{release}.started").exists():
                assert proc.poll() is None, output_file.read_text()
                assert time.time() < deadline, "fake python never started"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGUSR1)
            while "USR1" not in output_file.read_text():
                assert time.time() < deadline, output_file.read_text()
                time.sleep(0.05)
            release.touch()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = output_file.read_text()
    assert proc.returncode == 0, output
    assert "--from report" in output
    assert not (fake.run_dir / "report.md").exists() and not list(fake.run_dir.rglob("STOP"))
    assert not requeues(fake) and not fake.calls("srun")


def test_stage_failure_is_not_requeued(fake):
    """A training run that crashes with exit code 3 is a failure (recipe.sh exit 1), not a stop."""
    proc = fake.stage("pretrain", "fail")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(fake.calls("accelerate")) == 2 and not requeues(fake)
    assert "not requeueing" in proc.stdout


def test_stage_usage_errors(fake):
    proc = fake.stage("no_such_stage")
    assert proc.returncode == 2 and "no stage 'no_such_stage'" in proc.stderr
    proc = subprocess.run(["bash", str(STAGE_SBATCH), CFG, str(fake.run_dir)], cwd=ROOT, env=fake.env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
    assert not fake.calls("accelerate") and not fake.calls("python")
