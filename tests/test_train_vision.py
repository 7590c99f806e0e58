"""train_vision.py: contrastive (captions) and class-text (labels) training of a tiny two-tower CLIP on the real
micrograph records lowers the held-out loss, and the export is a plain CLIPModel whose vision half train_moe.py's
build_vlm takes as its tower, weights exactly."""
from __future__ import annotations

import pytest
import torch

from semivlm import vlm

TINY_CLIP = {"vision_config": {"image_size": 64, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 2},
             "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
             "projection_dim": 32}


@pytest.mark.slow
@pytest.mark.parametrize("objective,data", [("contrastive", "captions"), ("classify", "classify")])
def test_vision_pretraining_lowers_loss_and_exports_a_tower_build_vlm_loads(objective, data, pipeline, llm_dir,
                                                                             tmp_path):
    from transformers import CLIPModel

    from train_vision import VisionConfig, main

    files = [str(pipeline / f"annotations/{data}.jsonl")]
    cfg = VisionConfig(output_dir=str(tmp_path / "vision"), tokenizer=str(llm_dir), model_config=TINY_CLIP,
                       train_data=files, eval_data=files, train_split="", eval_split="", objective=objective,
                       augment="jitter", micro_batch_size=4, max_steps=40, learning_rate=3e-3, warmup_steps=2,
                       eval_every=0, eval_batches=1, save_every=0, log_every=20, ds_config="ds_configs/zero3_fp32.json")
    result = main(cfg)
    evals = [h["eval_loss"] for h in result["history"] if "eval_loss" in h]
    assert evals[-1] < evals[0] * 0.8, evals  # the same 4 records: it must at least fit them
    clip = CLIPModel.from_pretrained(result["final_dir"])
    model, _ = vlm.build_vlm(result["final_dir"], str(llm_dir))
    tower = {k.removeprefix("vision_model."): v for k, v in model.model.vision_tower.state_dict().items()}
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(tower[k], v), k


def test_classify_objective_refuses_a_held_out_class_it_never_trained_on(pipeline, llm_dir, tmp_path):
    import json

    from train_vision import VisionConfig, main

    rows = [json.loads(x) for x in (pipeline / "annotations/classify.jsonl").read_text().splitlines()]
    rows[-1]["meta"]["split"] = "validation"
    rows[-1]["messages"][-1]["content"][0]["text"] = "a class nobody trained"
    path = tmp_path / "classify.jsonl"
    for r in rows:
        r["images"] = [str((pipeline / "annotations" / r["images"][0]).resolve())]
    for r in rows[:-1]:
        r["meta"]["split"] = "train"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = VisionConfig(output_dir=str(tmp_path / "v"), tokenizer=str(llm_dir), model_config=TINY_CLIP,
                       train_data=[str(path)], objective="classify", micro_batch_size=2, max_steps=1,
                       ds_config="ds_configs/zero3_fp32.json")
    with pytest.raises(SystemExit, match="a class nobody trained"):
        main(cfg)


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_an_image_that_breaks_at_train_time_is_named_in_one_line_or_replaced_and_counted(skip_invalid, pipeline,
                                                                                         llm_dir, tmp_path, capsys):
    """Pixels are decoded per micro-batch in DataLoader workers, not up front: a truncated PNG (its header reads, its
    pixels do not) stops the run with one line naming file and record, or under skip_invalid becomes a blank image."""
    import json
    import shutil

    from train_vision import VisionConfig, main

    rows = [json.loads(x) for x in (pipeline / "annotations/classify.jsonl").read_text().splitlines()][:4]
    for r in rows:
        r["images"] = [str((pipeline / "annotations" / r["images"][0]).resolve())]
    broken = tmp_path / "truncated.png"
    shutil.copy(rows[0]["images"][0], broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    rows[0]["images"] = [str(broken)]
    path = tmp_path / "classify.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = VisionConfig(output_dir=str(tmp_path / "v"), tokenizer=str(llm_dir), model_config=TINY_CLIP,
                       train_data=[str(path)], train_split="", eval_split="", objective="classify",
                       micro_batch_size=4, max_steps=1, eval_every=0, save_every=0, num_workers=1,
                       skip_invalid=skip_invalid, ds_config="ds_configs/zero3_fp32.json")
    if not skip_invalid:
        with pytest.raises(SystemExit, match=rf"bad record: train: .*{rows[0]['id']}.*image does not decode.*"
                                             r"truncated\.png") as e:
            main(cfg)
        assert "\n" not in str(e.value)
        return
    result = main(cfg)
    assert [h["step"] for h in result["history"] if "loss" in h] == [1]
    replaced = [x for x in capsys.readouterr().out.splitlines() if "replaced by a blank image" in x]
    assert replaced and "truncated.png" in replaced[0] and rows[0]["id"] in replaced[0]


def test_lazily_decoded_batches_hold_the_pixels_the_up_front_cache_held(pipeline, llm_dir, tmp_path):
    """What keeps the held-out metrics: a micro-batch decoded by ImageCollate is the tensor vlm.load_pixel_values
    made for every record up front, bit for bit (only the augmentation's random stream may differ)."""
    from functools import partial
    from pathlib import Path

    from semivlm import record_index
    from train_vision import VisionConfig, build_clip, collate_pairs, image_text_pairs

    files = [str(pipeline / "annotations/captions.jsonl")]
    cfg = VisionConfig(tokenizer=str(llm_dir), model_config=TINY_CLIP, train_split="")
    _, processor = build_clip(cfg, torch.float32)
    rows = image_text_pairs(cfg, processor, files, "", "train", print)
    assert rows and all("pixel_values" not in r for r in rows)  # nothing decoded while reading the records
    batch = record_index.ImageCollate(partial(collate_pairs, pad_id=processor.tokenizer.pad_token_id, patches=16),
                                      processor)(rows)
    expected = torch.cat([vlm.load_pixel_values(processor, r["images"], Path("."), r["id"], 5.0, {}) for r in rows])
    assert batch["pixel_values"].shape == (len(rows), 3, 64, 64)
    assert torch.equal(batch["pixel_values"], expected)


def test_image_cache_serves_repeated_images_bit_equal_and_stops_at_its_size(pipeline, llm_dir, tmp_path):
    """Many epochs over few images decode each once (the vision stage spent half its time decoding), and the cache
    never holds more than image_cache_mb: images beyond it are decoded every time. A worker's copy starts empty."""
    import pickle
    from functools import partial

    from semivlm import record_index
    from train_vision import VisionConfig, build_clip, collate_pairs, image_text_pairs

    cfg = VisionConfig(tokenizer=str(llm_dir), model_config=TINY_CLIP, train_split="")
    _, processor = build_clip(cfg, torch.float32)
    rows = image_text_pairs(cfg, processor, [str(pipeline / "annotations/captions.jsonl")], "", "train", print)
    rows = list({r["images"][0]: r for r in rows}.values())  # one row per distinct image
    assert len(rows) >= 3
    collate = partial(collate_pairs, pad_id=processor.tokenizer.pad_token_id, patches=16)
    one_image = 3 * 64 * 64 * 4  # float32 pixels of the tiny tower
    uncached = record_index.ImageCollate(collate, processor)(rows)["pixel_values"]
    cache = record_index.ImageCollate(collate, processor, cache_mb=2.5 * one_image / 2 ** 20)  # room for 2 images
    decoded = []
    real_load = vlm.load_image

    def counting_load(path, *args):
        decoded.append(path)
        return real_load(path, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vlm, "load_image", counting_load)
        first, second = cache(rows)["pixel_values"], cache(rows)["pixel_values"]
    assert torch.equal(first, uncached) and torch.equal(second, uncached)
    assert len(cache.cache) == 2 and cache.cached_bytes == 2 * one_image <= cache.cache_mb * 2 ** 20
    assert len(decoded) == 2 * len(rows) - 2  # the second pass decodes only the images the cache had no room for
    assert pickle.loads(pickle.dumps(cache)).cache == {}
