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


# ---------------------------------------------------------------- fixtures shared by several test modules

# Llama-3's chat template, verbatim: no {% generation %} markers, renders its own BOS, trims content
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-3's pre-tokenizer regex (its tokenizer.json)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def corpus_text() -> list[str]:
    return [p.read_text(encoding="utf-8")[:6000] for p in sorted((REPO / "data/corpus").glob("*.md"))[:4]]


@pytest.fixture(scope="module")
def llama3_tok():
    """A Llama-3-style tokenizer built locally: its pre-tokenizer, special tokens, a BOS-adding post-processor
    (so a double BOS would show) and its chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_text(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 pad_token="<|end_of_text|>", extra_special_tokens=specials[2:4])
    hf.chat_template = LLAMA3_TEMPLATE
    return hf


# ---- the VLM modules (test_vlm, test_evaluate, test_export_gptq, test_train_vision): real micrograph records
TINY_VISION = {"clip": {"model_type": "clip_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
               "siglip": {"model_type": "siglip_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 64,
                          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """The real data pipeline on 4 tiny micrographs (64×64 and 64×88 with a data bar): synth -> annotate."""
    from data_prep.annotate import AnnotateConfig, main as annotate
    from data_prep.synth_micrographs import SynthConfig, main as synth

    root = tmp_path_factory.mktemp("pipeline")
    synth(SynthConfig(out=str(root / "micrographs"), n=4, size=64, seed=0))
    annotate(AnnotateConfig(manifest=str(root / "micrographs/manifest.jsonl"), out=str(root / "annotations"),
                            vqa_per_image=2))
    return root


def records(pipeline: Path, name: str = "captions") -> list[dict]:
    from semivlm.data import read_jsonl

    return list(read_jsonl(pipeline / f"annotations/{name}.jsonl"))


def save_llm(path: Path, tok, tie: bool = False) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, "max_position_embeddings": 1024}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(tok), tie_word_embeddings=tie,
                                                          **spec)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm_dir(pipeline, tmp_path_factory) -> Path:
    """What train_sft.py writes: a tiny Llama and the debug ChatML tokenizer (build_corpus's template)."""
    from data_prep.build_corpus import train_tokenizer

    texts = [m["content"][-1]["text"] for name in ("captions", "vqa", "classify") for r in records(pipeline, name)
             for m in r["messages"]]
    return save_llm(tmp_path_factory.mktemp("llm") / "sft", train_tokenizer(texts * 3, vocab_size=400), tie=True)
