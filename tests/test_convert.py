"""data_prep/convert.py: ours <-> LLaVA and ours <-> sharegpt (LLaMA-Factory) round trips; bad records named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_openai_server import make_manifest

from data_prep.annotate import AnnotateConfig
from data_prep.annotate import main as annotate
from data_prep.convert import ConvertConfig, main
from semivlm.data import RecordError, read_jsonl, text_record, write_jsonl_atomic


@pytest.fixture
def ours(tmp_path) -> Path:
    """Annotated micrographs (captions, VQA, classify) plus text, multi-turn and system-prompt records in one JSONL."""
    manifest = make_manifest(tmp_path / "data", 6)
    annotate(AnnotateConfig(manifest=str(manifest), out=str(tmp_path / "ann")))
    records = [r for n in ("captions", "vqa", "classify") for r in read_jsonl(tmp_path / "ann" / f"{n}.jsonl")]
    records.append(text_record("text-1", "Explain CMP dishing.", "Dishing is ...\n\nIt grows with line width.",
                               {"task": "instruction", "kind": "principle", "n": 3}))
    records.append({"id": "multi-1", "images": ["../data/images/synth_000000.png", "../data/images/synth_000001.png"],
                    "messages": [{"role": "system", "content": [{"type": "text", "text": "You are a microscopist."}]},
                                 {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                              {"type": "image"}, {"type": "text", "text": "with"},
                                                              {"type": "image"}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "The first is denser."}]},
                                 {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "More particles."}]}],
                    "meta": {"task": "vqa", "image_id": "synth_000000"}})
    path = tmp_path / "ann" / "all.jsonl"
    write_jsonl_atomic(path, records)
    return path


def resolved(records: list[dict], base: Path) -> list[dict]:
    return [{**r, "images": [str((base / p).resolve()) for p in r["images"]]} for r in records]


@pytest.mark.parametrize("fmt", ["llava", "sharegpt"])
def test_round_trip_through_llava_and_sharegpt_gives_the_records_back(ours, tmp_path, fmt):
    original = list(read_jsonl(ours))
    main(ConvertConfig(to=fmt, inputs=[str(ours)], out=str(tmp_path / fmt)))
    converted = json.loads((tmp_path / fmt / "all.json").read_text())
    assert len(converted) == len(original)
    first = converted[0]
    if fmt == "llava":
        assert set(first) == {"id", "image", "conversations", "meta"}
        assert first["conversations"][0]["from"] == "human" and first["conversations"][0]["value"].startswith(
            "<image>\n") and first["conversations"][1]["from"] == "gpt"
        assert (tmp_path / fmt / first["image"]).is_file()            # relative to --image_folder = out
        multi = next(c for c in converted if c["id"] == "multi-1")
        assert multi["system"] == "You are a microscopist." and len(multi["image"]) == 2
        assert multi["conversations"][0]["value"] == "Compare\n<image>\nwith\n<image>"
    else:
        assert first["messages"][0]["role"] == "user" and first["messages"][0]["content"].startswith("<image>")
        assert isinstance(first["meta"], str) and (tmp_path / fmt / first["images"][0]).is_file()
        info = json.loads((tmp_path / fmt / "dataset_info.json").read_text())
        assert info["all"] == {"file_name": "all.json", "formatting": "sharegpt",
                               "columns": {"messages": "messages", "images": "images"},
                               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                        "assistant_tag": "assistant", "system_tag": "system"}}
    main(ConvertConfig(to="ours", inputs=[str(tmp_path / fmt / "all.json")], out=str(tmp_path / "back")))
    back = list(read_jsonl(tmp_path / "back" / "all.jsonl"))
    assert resolved(back, tmp_path / "back") == resolved(original, ours.parent)


def write_llava(tmp_path: Path, items: list) -> Path:
    (tmp_path / "img.png").write_bytes(b"")
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(items))
    return path


GOOD = {"id": "ok", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                          {"from": "gpt", "value": "Particles."}]}


@pytest.mark.parametrize("bad, message", [
    ({"id": "two-tokens", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nHi"},
                                                               {"from": "gpt", "value": "Hello."}]},
     r"record 2 \(id two-tokens\): 2 <image> token\(s\) in the user turns but 1 image"),
    ({"id": "order", "image": "img.png", "conversations": [{"from": "gpt", "value": "Hi"},
                                                          {"from": "human", "value": "<image>\nHello"}]},
     r"record 2 \(id order\): roles out of order: turn 1 is 'assistant', expected 'user'"),
    ({"id": "nokey", "image": "img.png"}, r"record 2 \(id nokey\): missing 'conversations'"),
    ({"id": "role", "conversations": [{"from": "bot", "value": "x"}]}, r"record 2 \(id role\): turn 1 has unknown role"),
    ({"id": "gpt-img", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                            {"from": "gpt", "value": "<image> A"}]},
     r"record 2 \(id gpt-img\): turn 2 \(assistant\) contains <image>"),
    ({"id": "novalue", "conversations": [{"from": "human"}]}, r"record 2 \(id novalue\): turn 1 needs"),
])
def test_bad_llava_records_are_named_or_skipped_and_counted(tmp_path, bad, message):
    path = write_llava(tmp_path, [GOOD, bad, GOOD | {"id": "ok2"}])
    with pytest.raises(RecordError, match=rf"llava\.json: {message}"):
        main(ConvertConfig(to="ours", inputs=[str(path)], out=str(tmp_path / "out")))
    stats = main(ConvertConfig(to="ours", inputs=[str(path)], out=str(tmp_path / "out"), skip_invalid=True))
    assert stats[str(path)]["written"] == 2 and stats[str(path)]["invalid"] == 1


def test_bad_records_of_ours_are_named_by_file_and_id(tmp_path):
    rec = text_record("t1", "Q", "A", {})
    bad = {**rec, "id": "mismatch", "images": ["a.png"]}                  # one image, no image part
    path = tmp_path / "ours.jsonl"
    write_jsonl_atomic(path, [rec, bad])
    with pytest.raises(RecordError, match=r"ours\.jsonl: record 2 \(id mismatch\): 0 <image> token\(s\) in the user "
                                          r"turns but 1 image"):
        main(ConvertConfig(to="llava", inputs=[str(path)], out=str(tmp_path / "out")))
    write_jsonl_atomic(path, [rec, {k: v for k, v in rec.items() if k != "messages"} | {"id": "t2"}])
    with pytest.raises(RecordError, match=r"record 2 \(id t2\): missing key 'messages'"):
        main(ConvertConfig(to="sharegpt", inputs=[str(path)], out=str(tmp_path / "out")))
