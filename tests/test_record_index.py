"""semivlm/record_index.py: the record index on disk (same examples as the in-memory encoding, reused only for the
same inputs), images decoded per micro-batch in DataLoader workers (same batches, same order), and bad images at
index time (zero-byte file) and at decode time (truncated PNG)."""
from __future__ import annotations

import json
import re
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vlm import built, records  # noqa: F401  (fixture: tiny VLMs on the 4 micrographs of `pipeline`)

try:
    from test_vlm import llm_dir, pipeline  # noqa: F401
except ImportError:  # shared fixtures that live in conftest.py
    pass

from semivlm import record_index, vlm
from semivlm.data import RecordError, write_jsonl_atomic
from semivlm.loop import StepBatches, TrainConfig

SETTINGS = {"max_length": 512, "overflow": "truncate", "max_aspect_ratio": 5.0}


def rows_of(path: Path):
    return lambda: ((r, path.parent) for r in map(json.loads, path.read_text().splitlines()))


def open_index(path: Path, processor, index_dir: Path, log=None, **kw):
    return record_index.open_index("train", [str(path)], rows_of(path), processor, {**SETTINGS, **kw.pop("settings", {})},
                                   index_dir, log=log or (lambda *_: None), **kw)


def test_index_items_collate_to_the_batches_of_the_in_memory_encoding(built, pipeline, tmp_path):
    _, processor = built["clip"]
    data = pipeline / "annotations/captions.jsonl"
    eager, counts = vlm.encode_vlm_records(processor, records(pipeline), data.parent, 512)
    index = open_index(data, processor, tmp_path)
    assert len(index) == len(eager) == counts["kept"] == 4
    assert index.column("length").tolist() == [e["length"] for e in eager]
    collate = record_index.ImageCollate(partial(vlm.collate_vlm, pad_id=0), processor)
    lazy_batch, eager_batch = collate([index[i] for i in range(4)]), vlm.collate_vlm(eager, pad_id=0)
    assert lazy_batch.keys() == eager_batch.keys()
    for k in ("input_ids", "labels", "attention_mask", "pixel_values"):
        assert torch.equal(lazy_batch[k], eager_batch[k]), k
    row = index[0]
    assert row["pixel_values"] is None and Path(row["images"][0]).is_absolute() and row["image_sizes"][0][0] >= 64


def test_index_is_reused_for_the_same_inputs_and_rebuilt_for_other_records_tokenizer_or_settings(built, pipeline,
                                                                                                 tmp_path):
    _, processor = built["clip"]
    data = tmp_path / "data/captions.jsonl"
    data.parent.mkdir()
    shutil.copytree(pipeline / "micrographs", tmp_path / "micrographs")
    data.write_text((pipeline / "annotations/captions.jsonl").read_text())  # image paths ../micrographs/…
    log: list[str] = []
    index_dir = tmp_path / "index"

    def built_again(**kw) -> bool:
        log.clear()
        open_index(data, kw.pop("processor", processor), index_dir, log.append, **kw)
        return any("built the record index" in line for line in log)

    assert built_again() and not built_again()  # built once, then reused
    assert any("record index reused" in line for line in log)
    with data.open("a") as f:  # other records: the file's size and mtime change
        f.write(data.read_text().splitlines()[0].replace('"id": "', '"id": "extra-') + "\n")
    assert built_again() and not built_again()
    assert built_again(settings={"max_length": 256})  # other settings
    import copy

    processor2 = copy.deepcopy(processor)  # another tokenizer: one more token
    processor2.tokenizer.add_tokens(["<wafer_map>"])
    assert built_again(processor=processor2) and not built_again(processor=processor2)
    assert len(list(index_dir.glob("train-*"))) == 1  # the stale index was removed, never reused


def write_bad_images(pipeline: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """captions.jsonl beside copies of the micrographs, record 1 pointing at a zero-byte PNG and record 2 at a PNG
    cut in half (its header is whole). Returns (records file, id of the zero-byte record, id of the truncated one)."""
    shutil.copytree(pipeline / "micrographs", tmp_path / "micrographs")
    (tmp_path / "annotations").mkdir()
    rows = records(pipeline)
    image = tmp_path / "annotations" / rows[2]["images"][0]
    data = image.read_bytes()
    (image.parent / "truncated.png").write_bytes(data[: len(data) // 2])
    (image.parent / "empty.png").write_bytes(b"")
    rows[1]["images"] = [str(Path(rows[1]["images"][0]).parent / "empty.png")]
    rows[2]["images"] = [str(Path(rows[2]["images"][0]).parent / "truncated.png")]
    out = tmp_path / "annotations/captions.jsonl"
    write_jsonl_atomic(out, rows)
    return out, rows[1]["id"], rows[2]["id"]


def test_zero_byte_image_is_named_at_index_time_or_skipped_and_counted(built, pipeline, tmp_path):
    _, processor = built["clip"]
    data, empty_id, _ = write_bad_images(pipeline, tmp_path)
    with pytest.raises(RecordError) as e:
        open_index(data, processor, tmp_path / "index")
    message = str(e.value)
    assert "\n" not in message and empty_id in message and "empty.png" in message and "does not decode" in message
    index = open_index(data, processor, tmp_path / "index", skip_invalid=True)
    assert len(index) == 3 and index.meta["counts"]["invalid: image does not decode"] == 1


def test_truncated_png_is_named_when_decoded_or_replaced_by_a_blank_image_and_counted(built, pipeline, tmp_path):
    _, processor = built["clip"]
    data, _, truncated_id = write_bad_images(pipeline, tmp_path)
    index = open_index(data, processor, tmp_path / "index", skip_invalid=True)  # the header reads: indexed
    assert truncated_id in index.column("id").tolist()
    i = index.column("id").tolist().index(truncated_id)
    strict = record_index.ImageCollate(partial(vlm.collate_vlm, pad_id=0), processor)
    with pytest.raises(RecordError, match=rf"record {truncated_id}: image does not decode.*truncated\.png"):
        strict([index[i]])
    logged: list[str] = []
    lenient = record_index.ImageCollate(partial(vlm.collate_vlm, pad_id=0), processor, skip_invalid=True,
                                        log=logged.append)
    batch = lenient([index[j] for j in range(len(index))])
    assert batch["pixel_values"].shape[0] == len(index)  # the batch keeps its shape
    assert torch.equal(batch["pixel_values"][i], vlm.blank_pixel_values(processor)[0])
    assert lenient.replaced == 1 and len(logged) == 1 and truncated_id in logged[0] and "truncated.png" in logged[0]

    # the same through DataLoader workers: the error reaches the training process as the one line, not a traceback
    cfg = TrainConfig(micro_batch_size=1, grad_accum=1)
    steps = StepBatches(index, strict, cfg, 1, 0, lambda epoch: np.arange(len(index)))
    workers = record_index.WorkerBatches(steps, 2, strict.report)
    assert workers(0)[0]["pixel_values"].shape[0] == 1  # record 0 is fine
    with pytest.raises(RecordError, match=rf"^train: record {truncated_id}: image does not decode"):
        for step in range(1, len(index)):
            workers(step)


def test_worker_batches_are_the_step_batches_in_the_same_order(built, pipeline):
    _, processor = built["clip"]
    data = pipeline / "annotations/vqa.jsonl"
    index = record_index.open_index("vqa", [str(data)], rows_of(data), processor, SETTINGS,
                                    pipeline / "index", log=lambda *_: None)
    collate = record_index.ImageCollate(partial(vlm.collate_vlm, pad_id=0), processor)
    cfg = TrainConfig(micro_batch_size=3, grad_accum=2, seed=1)
    plain = StepBatches(index, collate, cfg, 2, 1)  # rank 1 of 2: its own slice of the order
    workers = record_index.WorkerBatches(StepBatches(index, collate, cfg, 2, 1), 2, collate.report, prefetch=2)
    for step in [0, 1, 2, 3, 7, 8]:  # 3 -> 7: a restart of the workers at another step
        a, b = plain(step), workers(step)
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in ("input_ids", "labels", "pixel_values"):
                assert torch.equal(x[k], y[k]), (step, k)


def test_train_moe_names_bad_images_in_one_line_or_skips_and_replaces_them_and_reuses_its_index(pipeline, llm_dir,
                                                                                                tmp_path, capsys):
    from conftest import REPO, reset_accelerate

    from semivlm.config import load_config
    from train_moe import MoEConfig, main

    data, empty_id, truncated_id = write_bad_images(pipeline, tmp_path)
    tiny_clip = {"model_type": "clip_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 32,
                 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

    def run(out: str, records: Path, **overrides) -> dict:
        values = {"output_dir": tmp_path / out, "stage": "projector", "init_from": llm_dir,
                  "vision_config": json.dumps(tiny_clip), "train_data": json.dumps([str(records)]), "train_split": "",
                  "eval_split": "", "max_length": 192, "micro_batch_size": 3, "max_steps": 1, "warmup_steps": 0,
                  "eval_batches": 1, "save_every": 0, "classify_eval": 0, "num_workers": 2,
                  "index_dir": tmp_path / "index", "ds_config": REPO / "ds_configs/zero3_fp32.json", **overrides}
        reset_accelerate()
        return main(load_config(MoEConfig, [x for k, v in values.items() for x in (f"--{k}", str(v))]))

    with pytest.raises(SystemExit) as e:  # the zero-byte file: found while the index is built
        run("a", data)
    assert re.fullmatch(rf"bad record: train: record {empty_id}: image does not decode \(.*empty\.png: .*\)",
                        str(e.value)), e.value
    capsys.readouterr()
    assert run("b", data, skip_invalid="true")["final_dir"]  # zero-byte skipped, truncated replaced in the worker
    log = capsys.readouterr().out
    assert "'invalid: image does not decode': 1" in log and "built the record index" in log
    assert re.search(rf"train: record {truncated_id}: image does not decode \(.*truncated\.png.*\): replaced by a "
                     r"blank image \(skip_invalid; 1 so far\)", log), log[-3000:]
    assert re.search(r"step 1/1 .* data wait \d+\.\d%", log)
    assert run("c", data, skip_invalid="true")["final_dir"]
    log = capsys.readouterr().out
    assert "record index reused" in log and "built the record index" not in log

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    only_truncated = data.with_name("truncated_only.jsonl")
    write_jsonl_atomic(only_truncated, [r for r in rows if r["id"] != empty_id])
    with pytest.raises(SystemExit) as e:  # the truncated PNG: its header reads, its pixels do not (a worker finds it)
        run("d", only_truncated)
    assert re.fullmatch(rf"bad record: train: record {truncated_id}: image does not decode \(.*truncated\.png: .*\)",
                        str(e.value)), e.value
