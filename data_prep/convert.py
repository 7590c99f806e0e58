"""Convert between the project's multimodal JSONL and LLaVA's JSON or LLaMA-Factory's sharegpt JSON.

    python data_prep/convert.py --to llava --inputs runs/demo/annotations/vqa.jsonl --out runs/demo/llava
    python data_prep/convert.py --to sharegpt --inputs "[runs/demo/annotations/captions.jsonl, runs/demo/annotations/vqa.jsonl]" --out runs/demo/llamafactory
    python data_prep/convert.py --to ours --inputs /data/llava/llava_v1_5_mix665k.json --image_folder /data/llava/images --out /data/llava/ours

Formats (input format detected per file: *.jsonl = ours; *.json = a list of LLaVA or sharegpt records):
* ours (semivlm/data.py): {"id", "images": [...], "messages": [{"role", "content": [{"type": "image"} |
  {"type": "text", "text"}]}], "meta"}; image paths relative to the JSONL's directory.
* LLaVA: [{"id", "image": "a.png" (a list when several, absent when none), "conversations": [{"from": "human" |
  "gpt", "value": "<image>\\n..."}], "meta": {...}, "system": "..." (only if there is a system message)}]. Image
  paths are relative to the output directory: train LLaVA with --image_folder <out>.
* sharegpt, LLaMA-Factory's OpenAI-style variant (the README of its data directory): [{"messages": [{"role": "system" | "user" |
  "assistant", "content": "<image>..."}], "images": [...], "id", "meta": "<JSON string>"}], registered in
  <out>/dataset_info.json with formatting "sharegpt", columns messages/images and tags role/content/user/assistant/
  system; image paths relative to <out> (LLaMA-Factory's dataset_dir). meta is a JSON string so that Arrow sees one
  type. Reading also accepts the from/value variant ("conversations", human/gpt) and LLaVA's "image".
Typed content <-> text: an image part becomes "<image>", parts are joined with "\\n"; reading splits on "<image>"
and drops the "\\n" next to it, so ours -> LLaVA -> ours and ours -> sharegpt -> ours give the records back.
Bad records (missing keys, roles out of order, <image> tokens that do not match the images, unknown roles) raise an
error naming the file and record, or with --skip_invalid are skipped and counted in stats.json.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from semivlm.config import ConfigError, load_config
from semivlm.data import RecordError, read_jsonl, write_jsonl_atomic

IMAGE = "<image>"
ROLES_IN = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LLAVA_ROLE = {"user": "human", "assistant": "gpt"}


@dataclass
class ConvertConfig:
    to: str = ""                        # llava | sharegpt | ours
    inputs: list[str] | str = field(default_factory=list)   # files: *.jsonl (ours) or *.json (LLaVA / sharegpt)
    out: str = ""                       # output directory: <stem>.json / <stem>.jsonl per input (+ dataset_info.json)
    image_folder: str = ""              # reading LLaVA/sharegpt: folder their image paths are relative to ("" = file's)
    skip_invalid: bool = False          # skip and count bad records instead of stopping


# ------------------------------------------------------------------------------------------------ content <-> text
def content_to_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(f"{where}: content must be a string or a list of typed parts")
    parts = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") not in ("image", "text") or \
                (p["type"] == "text" and not isinstance(p.get("text"), str)):
            raise RecordError(f"{where}: content part {p!r} is not {{'type': 'image'}} or {{'type': 'text', 'text'}}")
        parts.append(IMAGE if p["type"] == "image" else p["text"])
    return "\n".join(parts)


def text_to_content(text: str) -> list[dict]:
    segments = re.split(f"({re.escape(IMAGE)})", text)
    parts = []
    for i, seg in enumerate(segments):
        if seg == IMAGE:
            parts.append({"type": "image"})
            continue
        if i > 0 and segments[i - 1] == IMAGE and seg.startswith("\n"):
            seg = seg[1:]
        if i + 1 < len(segments) and segments[i + 1] == IMAGE and seg.endswith("\n"):
            seg = seg[:-1]
        if seg:
            parts.append({"type": "text", "text": seg})
    return parts


def check_turns(turns: list[tuple[str, str]], n_images: int, where: str) -> None:
    """Roles: optional system, then user/assistant alternating from user, ending on assistant; <image> tokens only
    in user turns, as many as images."""
    if not turns:
        raise RecordError(f"{where}: no messages")
    body = turns[1:] if turns[0][0] == "system" else turns
    for i, (role, _) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(f"{where}: roles out of order: turn {i + 1 + (len(turns) - len(body))} is '{role}', "
                              f"expected '{expected}' (system first, then user/assistant alternating)")
    if not body or body[-1][0] != "assistant":
        raise RecordError(f"{where}: the conversation does not end with an assistant turn")
    for i, (role, text) in enumerate(turns):
        if role != "user" and IMAGE in text:
            raise RecordError(f"{where}: turn {i + 1} ({role}) contains {IMAGE}; only user turns may")
    n_tokens = sum(text.count(IMAGE) for role, text in turns if role == "user")
    if n_tokens != n_images:
        raise RecordError(f"{where}: {n_tokens} {IMAGE} token(s) in the user turns but {n_images} image(s)")


# ----------------------------------------------------------------------------------------------- the converters
def ours_to_turns(rec: dict, where: str) -> tuple[list[tuple[str, str]], list[str]]:
    for key in ("id", "images", "messages"):
        if key not in rec:
            raise RecordError(f"{where}: missing key '{key}'")
    if not isinstance(rec["images"], list) or not all(isinstance(x, str) for x in rec["images"]):
        raise RecordError(f"{where}: 'images' must be a list of paths")
    turns = []
    for i, m in enumerate(rec["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise RecordError(f"{where}: message {i + 1} needs a role (system/user/assistant) and content")
        turns.append((m["role"], content_to_text(m["content"], f"{where}: message {i + 1}")))
    check_turns(turns, len(rec["images"]), where)
    return turns, rec["images"]


def to_llava(rec: dict, where: str) -> dict:
    turns, images = ours_to_turns(rec, where)
    item = {"id": rec["id"]}
    if images:
        item["image"] = images[0] if len(images) == 1 else images
    if turns[0][0] == "system":
        item["system"], turns = turns[0][1], turns[1:]
    item["conversations"] = [{"from": LLAVA_ROLE[r], "value": t} for r, t in turns]
    item["meta"] = rec.get("meta", {})
    return item


def to_sharegpt(rec: dict, where: str) -> dict:
    turns, images = ours_to_turns(rec, where)
    return {"id": rec["id"], "messages": [{"role": r, "content": t} for r, t in turns], "images": images,
            "meta": json.dumps(rec.get("meta", {}), ensure_ascii=False, sort_keys=True)}


def from_turn_format(item: dict, where: str, index: int) -> dict:
    """A LLaVA or sharegpt record (from/value or role/content) -> ours."""
    if not isinstance(item, dict):
        raise RecordError(f"{where}: not a JSON object")
    key = "messages" if "messages" in item else "conversations" if "conversations" in item else None
    if key is None or not isinstance(item[key], list):
        raise RecordError(f"{where}: missing 'conversations' (LLaVA, sharegpt) or 'messages' (sharegpt) list")
    images = item.get("images", item.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise RecordError(f"{where}: 'image'/'images' must be a path or a list of paths")
    turns = [("system", item["system"])] if isinstance(item.get("system"), str) and item["system"] else []
    for i, t in enumerate(item[key]):
        role = t.get("from", t.get("role")) if isinstance(t, dict) else None
        text = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if role is None or not isinstance(text, str):
            raise RecordError(f"{where}: turn {i + 1} needs 'from'/'role' and a string 'value'/'content'")
        if role not in ROLES_IN:
            raise RecordError(f"{where}: turn {i + 1} has unknown role '{role}' (known: {', '.join(ROLES_IN)})")
        turns.append((ROLES_IN[role], text))
    check_turns(turns, len(images), where)
    meta = item.get("meta", {})
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            raise RecordError(f"{where}: 'meta' is a string but not JSON") from None
    messages = [{"role": r, "content": [{"type": "text", "text": t}] if r != "user" else text_to_content(t)}
                for r, t in turns]
    return {"id": str(item.get("id", index)), "images": images, "messages": messages, "meta": meta}


# ------------------------------------------------------------------------------------------------------ driver
def rebase(path: str, src_dir: Path, dst_dir: Path) -> str:
    """An image path relative to src_dir, rewritten relative to dst_dir (absolute paths stay absolute)."""
    if os.path.isabs(path):
        return path
    return os.path.relpath(os.path.abspath(src_dir / path), os.path.abspath(dst_dir))


def read_records(path: Path, cfg: ConvertConfig, counts: Counter) -> list[tuple[dict, str]]:
    """(record in our format with image paths relative to the input's image folder, name for errors)."""
    if path.suffix == ".jsonl":
        return [(r, f"{path}: record {i} (id {r.get('id', '?')})")
                for i, r in enumerate(read_jsonl(path, cfg.skip_invalid, counts), 1)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecordError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records (LLaVA or sharegpt)")
    out = []
    for i, item in enumerate(data, 1):
        where = f"{path}: record {i} (id {item.get('id', '?') if isinstance(item, dict) else '?'})"
        try:
            out.append((from_turn_format(item, where, i), where))
        except RecordError as e:
            if not cfg.skip_invalid:
                raise
            counts["invalid"] += 1
            print(f"[convert] skip {e}", flush=True)
    return out


def main(cfg: ConvertConfig) -> dict:
    if cfg.to not in ("llava", "sharegpt", "ours"):
        raise ConfigError(f"--to must be llava, sharegpt or ours, got '{cfg.to}'")
    inputs = [cfg.inputs] if isinstance(cfg.inputs, str) else list(cfg.inputs)
    if not inputs or not cfg.out:
        raise ConfigError("--inputs (one or more files) and --out (a directory) are required")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stats, dataset_info = {}, {}
    for name in inputs:
        path, counts = Path(name), Counter()
        src = Path(cfg.image_folder) if cfg.image_folder and path.suffix != ".jsonl" else path.parent
        converted, ids = [], set()
        for rec, where in read_records(path, cfg, counts):
            try:
                if rec.get("id") in ids:
                    raise RecordError(f"{where}: duplicate id '{rec.get('id')}'")
                ids.add(rec.get("id"))
                rec = {**rec, "images": [rebase(p, src, out) for p in rec.get("images", [])]}
                if cfg.to == "llava":
                    converted.append(to_llava(rec, where))
                elif cfg.to == "sharegpt":
                    converted.append(to_sharegpt(rec, where))
                else:
                    ours_to_turns(rec, where)                   # validates
                    converted.append(rec)
            except RecordError as e:
                if not cfg.skip_invalid:
                    raise
                counts["invalid"] += 1
                print(f"[convert] skip {e}", flush=True)
        target = out / (path.stem + (".jsonl" if cfg.to == "ours" else ".json"))
        if target.resolve() == path.resolve():
            raise ConfigError(f"output {target} would overwrite the input; choose another --out")
        if cfg.to == "ours":
            write_jsonl_atomic(target, converted)
        else:
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(json.dumps(converted, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            tmp.replace(target)
        if cfg.to == "sharegpt":
            dataset_info[path.stem] = {"file_name": target.name, "formatting": "sharegpt",
                                       "columns": {"messages": "messages", "images": "images"},
                                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                                "assistant_tag": "assistant", "system_tag": "system"}}
        stats[str(path)] = {"written": len(converted), "output": str(target), **counts}
        print(f"[convert] {path} -> {target}: {len(converted)} records ({dict(counts) or 'none skipped'})", flush=True)
    if dataset_info:
        (out / "dataset_info.json").write_text(json.dumps(dataset_info, indent=2) + "\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


if __name__ == "__main__":
    main(load_config(ConvertConfig))
