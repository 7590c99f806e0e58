"""Records shared by the data-prep scripts and the trainers: JSONL I/O with errors that name file and line,
the micrograph categories, and the multimodal record format every script reads and writes.

Multimodal record (one JSONL line):
    {"id", "images": ["rel/path.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]},
                  {"role": "assistant", "content": [{"type": "text", "text": ...}]}],
     "meta": {"task": "caption" | "vqa" | "classify" | "instruction", ...}}
Image paths are relative to the JSONL file's directory.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

# The 10 categories of the public SEM dataset of Aversa et al. (2018): id -> how a person names it
CATEGORIES = {
    "biological": "biological sample",
    "fibres": "fibres",
    "films_coated_surface": "film or coated surface",
    "mems_devices_electrodes": "MEMS device or electrode",
    "nanowires": "nanowires",
    "particles": "particles",
    "patterned_surface": "patterned surface",
    "porous_sponge": "porous sponge",
    "powder": "powder",
    "tips": "tips",
}


def fmt_length(nm: float) -> str:
    """A length in nm as people write it: 0.5 nm, 4.2 nm, 48 nm, 200 nm, 1.25 µm, 2 µm."""
    if nm >= 1000:
        return f"{nm / 1000:.2f}".rstrip("0").rstrip(".") + " µm"
    return f"{nm:.0f} nm" if nm >= 10 else f"{nm:.1f}".rstrip("0").rstrip(".") + " nm"


class RecordError(ValueError):
    """A bad input record; the message names the file and line (or record id)."""


@contextlib.contextmanager
def exit_on_bad_record():
    """A bad record is the user's to fix: a script's RecordError ends it with one line naming it, not a traceback."""
    try:
        yield
    except RecordError as e:
        raise SystemExit(f"bad record: {e}") from None


def read_jsonl(path: str | Path, skip_bad: bool = False, counts: dict | None = None) -> Iterator[dict]:
    """Yield the objects of a JSONL file. A line that is not a JSON object raises RecordError naming file:line,
    or, with skip_bad, is skipped and counted in counts["bad_json"]."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file does not exist")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if not skip_bad:
                    raise RecordError(f"{path}:{lineno}: not a JSON object ({e})") from None
                if counts is not None:
                    counts["bad_json"] = counts.get("bad_json", 0) + 1
                continue
            yield obj


def write_jsonl_atomic(path: str | Path, rows) -> int:
    """Write all rows to a temporary file, then rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return n


def append_jsonl(f, row: dict) -> None:
    """Append one row to an open file and flush it, so an interrupted run keeps every finished row."""
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


def image_record(record_id: str, image: str, question: str, answer: str, meta: dict) -> dict:
    """One image, one user question, one assistant answer, in the typed-content message format."""
    return {"id": record_id, "images": [image],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "meta": meta}


def text_record(record_id: str, prompt: str, response: str, meta: dict) -> dict:
    return {"id": record_id, "images": [],
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]},
                         {"role": "assistant", "content": [{"type": "text", "text": response}]}],
            "meta": meta}


def record_task(record: dict) -> str:
    """meta.task, else "vqa" for a record with images and "instruction" for a text-only one."""
    return record.get("meta", {}).get("task") or ("vqa" if record.get("images") else "instruction")
