"""Shared fixtures: tiny tokenizers, token blocks and model configs built locally (no hub, no network)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


# fp32 machine epsilon (2^-23 ≈ 1.19e-7). Two fp32 evaluations of one sum of n terms, accumulated in different orders
# (other GEMM blocking, thread count, padding width, kernel), are each within (n-1)·eps/2·Σ|x| of the exact sum
# (Higham, Accuracy and Stability of Numerical Algorithms, §4.2), so within n·eps·Σ|x| of each other. Tolerances in
# the tests are derived from this bound rather than from what one CPU happens to give.
EPS32 = 2.0 ** -23


def fp32_sum_tol(n_terms: int, magnitude: float) -> float:
    """Bound on the difference of two fp32 evaluations of a sum of `n_terms` terms with Σ|x| = `magnitude`."""
    return n_terms * EPS32 * magnitude


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process training run needs them cleared."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-model tests: they gain nothing from threads, and on a shared 2-core machine they lose ~10x
    to contention (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_blocks(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer and 64-token blocks of process-engineering sentences: train/ and val/."""
    from datasets import Dataset
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_blocks")
    steps = ["the wafer is cleaned in SC1 at 75 C", "a 5 nm gate oxide grows in dry oxygen at 900 C",
             "the resist is exposed at 193 nm and developed", "boron is implanted at 20 keV",
             "copper fills the trench and CMP removes the overburden", "the CD-SEM measures a 32 nm line"]
    text = [f"lot {i}: " + ", then ".join(steps[(i + k) % len(steps)] for k in range(4)) + "." for i in range(600)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.save_pretrained(root / "tokenizer")
    ids: list[int] = []
    for t in text:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    blocks = [ids[i : i + 64] for i in range(0, len(ids) - 63, 64)]
    Dataset.from_dict({"input_ids": blocks[:-16]}).save_to_disk(root / "train")
    Dataset.from_dict({"input_ids": blocks[-16:]}).save_to_disk(root / "validation")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_blocks) -> Path:
    """A random tiny Llama saved with save_pretrained: what `init_from` gets instead of a hub id in tests."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=400, **spec))
    path = tmp_path_factory.mktemp("tiny_model") / "llama"
    model.save_pretrained(path)
    return path


@pytest.fixture
def pretrain_args(tiny_blocks, tmp_path):
    """Command-line arguments for a ~10 s train_pretrain.py run on the tiny blocks."""
    def make(output_dir: Path | None = None, **overrides) -> list[str]:
        values = {"output_dir": str(output_dir or tmp_path / "run"), "tokenizer": str(tiny_blocks / "tokenizer"),
                  "train_data": str(tiny_blocks / "train"), "eval_data": str(tiny_blocks / "validation"),
                  "model_config": json.dumps(TINY_LLAMA), "max_steps": 8, "micro_batch_size": 4, "grad_accum": 2,
                  "learning_rate": 3e-3, "warmup_steps": 2, "eval_every": 0, "eval_batches": 2, "save_every": 0,
                  "ds_config": str(REPO / "ds_configs/zero3_fp32.json"), **overrides}
        return [x for k, v in values.items() for x in (f"--{k}", str(v))]
    return make


def run_script(args: list[str], timeout: int, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repo root with a hard timeout, so a distributed hang fails instead of blocking CI."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    # its own session, so that on a timeout the launcher's worker ranks are killed too, not left hanging
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
