"""Fake SLURM executables for the launch tests (train.sbatch, the recipe chain): srun, scontrol and accelerate
scripts that log one JSON object per call to $FAKE_LOG and act out what a real run would leave behind."""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

# The fakes log one JSON object per call. srun runs its command once per node with SLURM_NODEID set, like real srun
# with --ntasks-per-node=1 (sequentially here), and returns the first non-zero exit code.
FAKE_SRUN = """#!{python}
import json, os, subprocess, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": "srun", "argv": sys.argv[1:],
                         "SRUN_CPUS_PER_TASK": os.environ.get("SRUN_CPUS_PER_TASK")}}) + "\\n")
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
rc = 0
for node in range(int(os.environ["SLURM_NNODES"])):
    r = subprocess.call(args, env=dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node)))
    rc = rc or r
sys.exit(rc)
"""
FAKE_SCONTROL = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": "scontrol", "argv": sys.argv[1:]}}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(os.environ.get("FAKE_HOSTNAMES", "node01 node02").split()))
"""
# FAKE_MODE: finish (writes final/config.json), stop (the STOP file exists, no final), fail (exit 3),
# wait_stop (writes a marker, then waits for the batch shell to create STOP, like a run that gets USR1)
FAKE_ACCELERATE = """#!{python}
import json, os, sys, time
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": "accelerate", "argv": argv, "SLURM_NODEID": os.environ.get("SLURM_NODEID"), "exe": sys.argv[0],
                         "nccl": {{k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_"))}}}}) + "\\n")
# where the real script would write: --output_dir X, --output_dir=X, else the config's value (FAKE_OUT)
out = Path(os.environ.get("FAKE_OUT", ""))
for i, a in enumerate(argv):
    if a == "--output_dir":
        out = Path(argv[i + 1])
    elif a.startswith("--output_dir="):
        out = Path(a.split("=", 1)[1])
mode = os.environ["FAKE_MODE"]
if mode == "fail":
    sys.exit(3)
out.mkdir(parents=True, exist_ok=True)
if mode == "finish":
    (out / "final").mkdir(exist_ok=True)
    (out / "final" / "config.json").write_text("{{}}")
elif mode == "stop":
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "STOP").touch()
elif mode == "wait_stop":
    (out / "started").touch()
    deadline = time.time() + 20
    while not (out / "STOP").exists():
        if time.time() > deadline:
            sys.exit(9)
        time.sleep(0.05)
    (out / "checkpoints").mkdir(exist_ok=True)
"""


def write_exe(path: Path, text: str) -> None:
    path.write_text(text.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install(bin_dir: Path, extra: dict[str, str] | None = None) -> None:
    """srun, scontrol, accelerate (and any extra name -> script text) as executables in bin_dir."""
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "accelerate": FAKE_ACCELERATE,
                       **(extra or {})}.items():
        write_exe(bin_dir / name, text)


def read_calls(log: Path, kind: str | None = None) -> list[dict]:
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in rows if kind is None or r["cmd"] == kind]
