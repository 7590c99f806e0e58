"""What a trained model answers and how likely it finds an answer: the model side of evaluate.py and export_gptq.py.

Text LLMs and VLMs go through the same functions: a record is a conversation (typed or string content) with an
optional list of images, exactly as the training scripts read it; a VLM directory is scored with its saved
processor, a text LLM with its tokenizer. Everything runs greedy and unsharded on one device (pick_device: the GPU
when there is one), answers in left-padded batches.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from semivlm import vlm
from semivlm.chat import encode_chat, end_of_turn_ids
from semivlm.data import RecordError


def pick_device(choice: str = "auto") -> torch.device:
    """Where evaluation runs: `auto` = the GPU when one is visible, else the CPU (a 3.6B MoE decoding thousands of
    answers on CPU cores while the job's GPU sits idle is what this avoids); `cuda` without a GPU is an error."""
    if choice not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"device '{choice}' is not one of auto, cpu, cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device: cuda, but no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver?); use auto or cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def load_model(path: str, dtype=torch.float32, strict: bool = False, device: str | torch.device = "cpu"):
    """(model, processor or tokenizer, is_vlm) of a saved directory, in eval mode on `device`. Clear errors for a
    directory that is not a model, a VLM saved without its processor, or an LLM without a tokenizer; strict: also for
    checkpoint tensors and model weights that do not match by name (vlm.refuse_unmatched)."""
    from transformers import AutoModelForCausalLM

    from semivlm.model import load_tokenizer

    d = Path(path)
    if not (d / "config.json").is_file():
        raise SystemExit(f"model '{path}' is not a model directory (no config.json)")
    if vlm.is_vlm_dir(d):
        if not any((d / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
            raise SystemExit(f"model '{path}' is a VLM without a processor (no processor_config.json or "
                             "preprocessor_config.json): save the processor beside the weights (processor.save_pretrained)")
        model, processor = vlm.load_vlm(str(d), dtype, strict=strict)
        return model.to(device).eval(), processor, True
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise SystemExit(f"model '{path}' has no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot load model '{path}': {str(e).splitlines()[0]}") from None
    if strict:
        vlm.refuse_unmatched(path, info)
    return model.to(device).eval(), load_tokenizer(str(d)), False


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def _prompt_messages(record: dict) -> list[dict]:
    messages = list(record.get("messages") or [])
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages:
        raise RecordError(f"record {record.get('id')!r}: no prompt (no message before the answer)")
    return messages


def reference(record: dict) -> str:
    """The record's last assistant turn, as text (the reference answer)."""
    last = (record.get("messages") or [{}])[-1]
    content = last.get("content") if isinstance(last, dict) and last.get("role") == "assistant" else None
    text = content if isinstance(content, str) else " ".join(
        p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")
    if not text.strip():
        raise RecordError(f"record {record.get('id')!r}: no reference answer (last turn is not an assistant text)")
    return text.strip()


def _string_content(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        c = m.get("content")
        if not isinstance(c, str):
            c = "\n".join("<image>" if p.get("type") == "image" else p.get("text", "") for p in c or [])
        out.append({"role": m["role"], "content": c})
    return out


@torch.no_grad()
def generate(model, processor, is_vlm: bool, records: list[tuple[dict, Path]], max_new_tokens: int = 64,
             batch_size: int = 8, progress=None) -> list[str]:
    """Greedy answers to the records' conversations without their last assistant turn, left-padded batches; images
    prepared exactly as in training. `progress(done, total)` is called after each batch."""
    tok = tokenizer_of(processor)
    side, tok.padding_side = tok.padding_side, "left"
    stops = end_of_turn_ids(tok)
    answers: list[str] = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            texts, images = [], []
            for record, root in chunk:
                messages = _prompt_messages(record)
                if is_vlm:
                    rid = str(record.get("id", ""))
                    images += [vlm.load_image(Path(root) / p, rid, fill=vlm.image_fill(processor))
                               for p in record.get("images") or []]
                    texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
                else:
                    texts.append(tok.apply_chat_template(_string_content(messages), tokenize=False,
                                                         add_generation_prompt=True))
            if is_vlm:
                enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                                add_special_tokens=False)
            else:
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=stops)
            answers += [a.strip() for a in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
            if progress:
                progress(len(answers), len(records))
    finally:
        tok.padding_side = side
    return answers


@torch.no_grad()
def classification_accuracy(model_dir: Path, rows: list[tuple[dict, Path]], limit: int, device="cpu",
                            dtype=torch.float32) -> dict:
    """Greedy answers to the held-out "what kind of sample is this?" records, matched to the reference label, on
    `device` (the run's GPU: on CPU in fp32 a 3.6B model's 200 answers outlast the other ranks' barrier)."""
    model, processor = vlm.load_vlm(model_dir, dtype)
    model.to(device).eval()
    hits, n, examples = 0, 0, []
    for record, root in [r for r in rows if r[0].get("meta", {}).get("task") == "classify"][:limit]:
        answer = vlm.generate_answer(model, processor, record, root, max_new_tokens=12)
        reference = record["messages"][-1]["content"][0]["text"]
        hit = same_class_answer(answer, reference)
        hits, n = hits + hit, n + 1
        examples.append({"id": record["id"], "reference": reference, "answer": answer})
    return {"classify_accuracy": hits / n if n else float("nan"), "classify_n": n, "examples": examples[:10]}


def same_class_answer(answer: str, reference: str) -> bool:
    """A generated class answer names the reference category: equal up to case, spacing and a final full stop."""
    return " ".join(answer.lower().split()).strip(" .") == " ".join(reference.lower().split()).strip(" .")


def encode_for_scoring(processor, is_vlm: bool, record: dict, root: Path, max_length: int, cache: dict | None = None):
    """input_ids/labels (+ pixel_values) of a record with the loss on its last assistant turn, as training encodes it."""
    if is_vlm:
        return vlm.encode_vlm_record(processor, record, root, max_length, cache=cache)
    messages = _string_content(record["messages"])
    return encode_chat(processor, messages, max_length, str(record.get("id", "")))


@torch.no_grad()
def sequence_logprobs(model, rows: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities of the labelled tokens, number of labelled tokens) per row."""
    batch = vlm.collate_vlm(rows, pad_id)
    inputs = {k: v.to(model.device) for k, v in batch.items() if not k.startswith("_") and k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(model.device)
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(1).cpu(), mask.sum(1).cpu()


@torch.no_grad()
def option_scores(model, processor, is_vlm: bool, records: list[tuple[dict, Path]], options: list[str],
                  max_length: int = 1024, progress=None) -> torch.Tensor:
    """(N, C) log-probability that the model answers record n with exactly option c (its tokens and the end of the
    turn): the likelihood ranking behind top-1/top-5 classification, never a parse of free text."""
    pad_id = tokenizer_of(processor).pad_token_id
    scores = torch.empty(len(records), len(options))
    for n, (record, root) in enumerate(records):
        rows, cache = [], {}  # the options share their record's pixels; none are kept past it (memory flat in N)
        for option in options:
            answer = {"role": "assistant", "content": [{"type": "text", "text": option}]}
            variant = {**record, "messages": _prompt_messages(record) + [answer]}
            rows.append(encode_for_scoring(processor, is_vlm, variant, root, max_length, cache))
        scores[n] = sequence_logprobs(model, rows, pad_id)[0]
        if progress:
            progress(n + 1, len(records))
    return scores


@torch.no_grad()
def answer_perplexity(model, processor, is_vlm: bool, records: list[tuple[dict, Path]], max_length: int = 1024,
                      batch_size: int = 8) -> dict:
    """Token-weighted perplexity of the reference answers (assistant tokens only), as training measures held-out loss."""
    pad_id = tokenizer_of(processor).pad_token_id
    total, tokens = 0.0, 0
    for start in range(0, len(records), batch_size):
        cache: dict = {}  # pixels of this batch only: memory flat in the number of records
        rows = [encode_for_scoring(processor, is_vlm, r, root, max_length, cache)
                for r, root in records[start:start + batch_size]]
        logp, n = sequence_logprobs(model, rows, pad_id)
        total, tokens = total - float(logp.sum()), tokens + int(n.sum())
    if tokens == 0:
        raise ValueError("perplexity: no answer tokens in the records")
    return {"perplexity": math.exp(min(total / tokens, 50.0)), "loss": total / tokens, "tokens": tokens}


@torch.no_grad()
def block_perplexity(model, blocks, batch_size: int = 8, limit: int = 0) -> dict:
    """Perplexity over fixed-length corpus blocks (a datasets directory from build_corpus.py), every token counted."""
    n = min(len(blocks), limit) if limit else len(blocks)
    total, tokens = 0.0, 0
    for start in range(0, n, batch_size):
        ids = torch.stack([torch.as_tensor(blocks[i]["input_ids"]) for i in range(start, min(start + batch_size, n))])
        ids = ids.long().to(model.device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        count = ids[:, 1:].numel()
        total, tokens = total + float(out.loss) * count, tokens + count
    return {"perplexity": math.exp(min(total / max(tokens, 1), 50.0)), "loss": total / max(tokens, 1), "tokens": tokens}


@torch.no_grad()
def routing_on(model, processor, records: list[tuple[dict, Path]], max_length: int = 1024, batch_size: int = 8) -> dict:
    """Per-layer expert shares (image vs text tokens) of a MoE VLM on held-out records (moe.RouterProbe.summary)."""
    from semivlm.moe import RouterProbe

    probe = RouterProbe(model)
    pad_id, image_id = tokenizer_of(processor).pad_token_id, model.config.image_token_id
    for start in range(0, len(records), batch_size):
        cache: dict = {}  # pixels of this batch only
        rows = [encode_for_scoring(processor, True, r, root, max_length, cache) for r, root in records[start:start + batch_size]]
        batch = vlm.collate_vlm(rows, pad_id)
        probe.start(batch["attention_mask"], batch["input_ids"] == image_id, record=True)
        model(**{k: v.to(model.device) for k, v in batch.items() if not k.startswith("_") and k != "labels"},
              use_cache=False)
        probe.losses()
    return probe.summary()


def is_moe(model) -> bool:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0))


def read_records(files: list[str], split: str = "") -> list[tuple[dict, Path]]:
    """(record, its file's directory) of every record of `split` (all when empty), errors naming file and line."""
    from semivlm.data import read_jsonl

    rows = []
    for path in files:
        if not Path(path).is_file():
            raise SystemExit(f"data file '{path}' does not exist")
        try:
            rows += [(r, Path(path).parent) for r in read_jsonl(path)
                     if not split or r.get("meta", {}).get("split", split) == split]
        except RecordError as e:
            raise SystemExit(str(e)) from None
    return rows


def disk_size(path) -> int:
    """Bytes of the weight files of a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def save_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=float) + "\n")
