"""semivlm/vlm.py: a Llava VLM built from an LLM directory and a tiny CLIP/SigLIP tower (save -> load -> train ->
generate on records of the real data pipeline), records encoded exactly as the processor expands them with labels
only on the answer, robust image loading, loud errors naming the record, mixed batches, modality grouping, image DPO.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EPS32, TINY_VISION, fp32_sum_tol, records, save_llm

from semivlm import vlm
from semivlm.chat import SkipRecord
from semivlm.data import RecordError, text_record

IMAGE_TOKENS = 64  # (64 / 8)² patches; CLIP's CLS is dropped ("default"), SigLIP has none ("full")


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def built(llm_dir):
    """kind -> (model, processor) straight from build_vlm (eval mode, no dropout)."""
    out = {}
    for kind, cfg in TINY_VISION.items():
        model, processor = vlm.build_vlm(cfg, str(llm_dir))
        out[kind] = (model.eval(), processor)
    return out


# --------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vlm_from_an_llm_dir_and_a_tiny_tower_saves_loads_trains_and_generates_on_a_real_micrograph(
        kind, built, pipeline, llm_dir, tmp_path):
    model, processor = built[kind]
    projector = model.model.multi_modal_projector  # LLaVA-1.5: Linear(vision->text) -> GELU -> Linear(text->text)
    assert [type(m).__name__ for m in projector.children()] == ["Linear", "GELUActivation", "Linear"]
    assert (projector.linear_1.in_features, projector.linear_1.out_features, projector.linear_2.out_features) == \
        (64, 64, 64)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    assert vlm.is_vlm_dir(tmp_path / "vlm") and not vlm.is_vlm_dir(llm_dir) and not vlm.is_vlm_dir(tmp_path / "none")
    loaded, proc = vlm.load_vlm(str(tmp_path / "vlm"))
    assert type(loaded).__name__ == "LlavaForConditionalGeneration" and type(proc).__name__ == "LlavaProcessor"

    rec = records(pipeline)[1]
    ex = vlm.encode_vlm_record(proc, rec, pipeline / "annotations", max_length=512)
    built_ex = vlm.encode_vlm_record(processor, rec, pipeline / "annotations", max_length=512)
    assert (ex["input_ids"], ex["labels"]) == (built_ex["input_ids"], built_ex["labels"])  # same after the round trip
    assert ex["input_ids"].count(proc.image_token_id) == IMAGE_TOKENS == loaded.config.image_seq_length
    assert ex["pixel_values"].shape == (1, 3, 64, 64) and ex["n_images"] == 1 and ex["has_image"]
    batch = vlm.collate_vlm([ex], proc.tokenizer.pad_token_id)
    out = loaded(**inputs(batch), use_cache=False)
    assert math.isfinite(float(out.loss.detach()))
    with torch.no_grad():
        before_saving = float(model(**inputs(batch), use_cache=False).loss)
    assert float(out.loss.detach()) == pytest.approx(before_saving, abs=1e-5)
    out.loss.backward()  # the gradient reaches the projector through the image tokens
    assert float(loaded.model.multi_modal_projector.linear_1.weight.grad.abs().sum()) > 0

    prompt = proc.apply_chat_template(rec["messages"][:1], tokenize=False, add_generation_prompt=True)
    image = vlm.load_image(pipeline / "annotations" / rec["images"][0], rec["id"], fill=vlm.image_fill(proc))
    enc = proc(text=prompt, images=[image], return_tensors="pt", add_special_tokens=False)
    generated = loaded.generate(**enc, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > enc["input_ids"].shape[1]
    answer = vlm.generate_answer(loaded, proc, rec, pipeline / "annotations", max_new_tokens=4)
    assert answer == proc.tokenizer.decode(generated[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    # a text-only record generates without pixels, as the bare language model would
    text_prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}],
                                           tokenize=False, add_generation_prompt=True)
    ids = proc.tokenizer(text_prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new = loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id,
                          eos_token_id=vlm.end_of_turn_ids(proc.tokenizer))[0, ids.shape[1]:]
    assert vlm.generate_answer(loaded, proc, text_record("t", "Hi?", "Hello.", {}), None, 3) == \
        proc.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_vlm_holds_the_llm_and_the_pretrained_towers_weights_exactly(built, llm_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPModel

    model, processor = built["clip"]
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    ids = torch.tensor([processor.tokenizer("the wafer is etched")["input_ids"]])
    with torch.no_grad():  # text-only: the VLM is the LLM (the added <image> row is never used here)
        assert torch.allclose(model(input_ids=ids).logits[..., :llm.config.vocab_size], llm(ids).logits, atol=1e-5)
    # a full two-tower CLIP checkpoint as `vision`: its vision part, weights copied, its normalisation kept
    clip = CLIPModel(AutoConfig.for_model("clip", vision_config={k: v for k, v in TINY_VISION["clip"].items()
                                                                 if k != "model_type"},
                                          text_config={"hidden_size": 32, "intermediate_size": 64,
                                                       "num_hidden_layers": 1, "num_attention_heads": 2}))
    clip.save_pretrained(tmp_path / "clip")
    vlm.image_processor("clip", 64, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]).save_pretrained(tmp_path / "clip")
    from_clip, proc = vlm.build_vlm(str(tmp_path / "clip"), str(llm_dir))
    theirs, ours = clip.vision_model.state_dict(), from_clip.model.vision_tower.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert list(proc.image_processor.image_mean) == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="image_size 32 differs"):
        vlm.build_vlm(str(tmp_path / "clip"), str(llm_dir), image_size=32)


# ------------------------------------------------------------------------------------------------- encoding
@pytest.fixture(scope="module")
def llama3_vlm(llama3_tok, tmp_path_factory):
    """A VLM whose LLM template knows only string content (Llama-3's): the processor's template converts."""
    return vlm.build_vlm(TINY_VISION["siglip"], str(save_llm(tmp_path_factory.mktemp("llm3") / "l3", llama3_tok)))


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_encoded_record_equals_the_processors_own_expansion_and_labels_only_the_answer(template, built, llama3_vlm,
                                                                                          pipeline):
    processor = built["clip"][1] if template == "chatml" else llama3_vlm[1]
    tok, root = processor.tokenizer, pipeline / "annotations"
    a, b = records(pipeline)[:2]
    two = {"id": "two", "images": a["images"] + b["images"], "messages": [  # image, text, image
        {"role": "user", "content": a["messages"][0]["content"] + [{"type": "image"}]}, a["messages"][1]]}
    for rec in records(pipeline, "vqa")[:3] + [two]:
        ex = vlm.encode_vlm_record(processor, rec, root, max_length=512)
        text = processor.apply_chat_template(rec["messages"], tokenize=False)
        assert text.count("<image>") == len(rec["images"]) == ex["n_images"]
        images = [vlm.load_image(root / p, rec["id"], fill=vlm.image_fill(processor)) for p in rec["images"]]
        theirs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
        assert theirs["input_ids"][0].tolist() == ex["input_ids"]
        assert torch.equal(theirs["pixel_values"], ex["pixel_values"])
        labelled = tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100])
        answer = rec["messages"][1]["content"][0]["text"]
        assert labelled == answer + ("<|im_end|>" if template == "chatml" else "<|eot_id|>")


def test_projector_can_read_the_last_layer_with_the_class_token_and_records_count_it(llm_dir, pipeline):
    model, processor = vlm.build_vlm(TINY_VISION["clip"], str(llm_dir), feature_layer=-1, feature_strategy="full")
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "full"
    record = records(pipeline)[0]
    example = vlm.encode_vlm_record(processor, record, pipeline / "annotations", 512)
    image_id = model.config.image_token_index
    assert sum(i == image_id for i in example["input_ids"]) == IMAGE_TOKENS + 1  # 64 patches + the class token
    with torch.no_grad():  # Llava checks that the features fill exactly the placeholders
        model.eval()(input_ids=torch.tensor([example["input_ids"]]), pixel_values=example["pixel_values"])
    with pytest.raises(SystemExit, match="layer 5"):
        vlm.build_vlm(TINY_VISION["clip"], str(llm_dir), feature_layer=5)


def test_text_only_records_encode_through_the_same_function_without_pixels(built):
    processor = built["clip"][1]
    ex = vlm.encode_vlm_record(processor, text_record("t1", "What does CMP remove?", "The copper overburden.", {}),
                               None, max_length=128)
    assert ex["pixel_values"] is None and ex["n_images"] == 0 and not ex["has_image"]
    assert processor.image_token_id not in ex["input_ids"]
    assert processor.tokenizer.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100]) == \
        "The copper overburden.<|im_end|>"


# --------------------------------------------------------------------------------------------------- images
def test_grayscale_16bit_float_palette_rgba_cmyk_images_become_rgb(tmp_path):
    from PIL import Image

    ramp = np.tile(np.linspace(0, 1, 32), (32, 1))
    wide = (1000 + 1000 * ramp).astype(np.uint16)
    wide[0, 0] = 65535  # one hot pixel: a min-max mapping would squash the ramp into a few grey levels
    rgba = Image.new("RGBA", (32, 32), (200, 100, 50, 255))
    rgba.putpixel((0, 0), (255, 255, 255, 0))  # fully transparent: composited on black
    palette = Image.new("P", (32, 32))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))
    files = {"gray.png": Image.fromarray((ramp * 255).astype(np.uint8)), "16bit.png": Image.fromarray(wide),
             "float.tif": Image.fromarray(ramp.astype(np.float32)), "palette.png": palette, "rgba.png": rgba,
             "la.png": Image.new("LA", (32, 32), (90, 255)), "cmyk.jpg": Image.new("CMYK", (32, 32), (0, 255, 255, 0)),
             "bw.png": Image.new("1", (32, 32), 1)}
    for name, image in files.items():
        image.save(tmp_path / name)
    out = {name: vlm.load_image(tmp_path / name, "r1") for name in files}
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    assert all(im.mode == "RGB" and im.size == (32, 32) for im in out.values())
    a16 = np.asarray(out["16bit.png"])
    assert (a16[..., 0] == a16[..., 2]).all() and a16[5, -1, 0] == 255 and a16[5, 0, 0] == 0
    assert len(np.unique(a16[5, :, 0])) > 25  # the percentile window keeps the ramp's grey levels
    assert np.asarray(out["float.tif"])[5, -1, 0] == 255
    assert tuple(np.asarray(out["palette.png"])[0, 0]) == (255, 0, 0) and tuple(np.asarray(out["palette.png"])[0, 31]) \
        == (0, 0, 0)
    assert tuple(np.asarray(out["rgba.png"])[0, 0]) == (0, 0, 0) and tuple(np.asarray(out["rgba.png"])[5, 5]) == \
        (200, 100, 50)
    assert tuple(np.asarray(out["la.png"])[3, 3]) == (90, 90, 90) and np.asarray(out["bw.png"]).min() == 255
    assert np.asarray(out["cmyk.jpg"])[4, 4, 0] > 200 > np.asarray(out["cmyk.jpg"])[4, 4, 1]


def test_wide_image_is_padded_not_cropped_so_a_stripe_at_its_far_end_survives(built, tmp_path):
    from PIL import Image

    processor = built["clip"][1]
    a = np.zeros((16, 160), np.uint8)
    a[:, -8:] = 255  # a bright stripe at the far right of a 10:1 image
    Image.fromarray(a).save(tmp_path / "wide.png")
    rec = {"id": "wide-1", "images": ["wide.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is at the right?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A bright stripe."}]}]}
    ex = vlm.encode_vlm_record(processor, rec, tmp_path, max_length=256, max_aspect_ratio=12)
    pv = ex["pixel_values"]
    assert pv.shape == (1, 3, 64, 64)
    assert float(pv[0, 0, 32, -2]) > 1.5 and float(pv[0, 0, 32, 30]) < -1.5  # stripe bright, image dark
    assert float(pv[0, :, 2, 30].abs().max()) < 0.05  # the padding is the normalisation mean: ~0
    cropped = processor.image_processor(images=[Image.fromarray(a).convert("RGB")], return_tensors="pt")
    assert float(cropped["pixel_values"].max()) < 0  # what padding avoids: the centre crop loses the stripe
    with pytest.raises(RecordError, match=r"wide-1: extreme aspect ratio .*wide.png: 160x16"):
        vlm.encode_vlm_record(processor, rec, tmp_path, max_length=256)


# ------------------------------------------------------------------------------------------------ bad input
def _bad_record(case: str, good: dict, root: Path) -> dict:
    rec = {**good, "id": f"bad-{case}"}
    user, answer = good["messages"]
    if case == "more placeholders":
        rec["messages"] = [{**user, "content": [{"type": "image"}] + user["content"]}, answer]
    elif case == "fewer placeholders":
        rec["messages"] = [{**user, "content": user["content"][1:]}, answer]
    elif case == "missing image":
        rec["images"] = ["../micrographs/images/gone.png"]
    elif case == "undecodable image":
        (root / "x.png").write_bytes(b"\x89PNG not really an image")
        rec["images"] = ["x.png"]
    elif case == "tiny image":
        from PIL import Image
        Image.new("L", (5, 40)).save(root / "tiny.png")
        rec["images"] = ["tiny.png"]
    elif case == "no assistant turn":
        rec["messages"] = [user]
    elif case == "image in assistant turn":
        rec["messages"] = [user, {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
        rec["images"] = good["images"] * 2
    return rec


BAD = [
    ("more placeholders", r"image count mismatch \(2 <image> placeholder\(s\) in the messages for 1 image\(s\)\)"),
    ("fewer placeholders", r"image count mismatch \(0 <image> placeholder\(s\) in the messages for 1 image\(s\)\)"),
    ("missing image", r"image not found \(.*gone.png\)"),
    ("undecodable image", r"image does not decode \(.*x.png: UnidentifiedImageError"),
    ("tiny image", r"image too small \(.*tiny.png: 5x40 < 8 px"),
    ("no assistant turn", "no assistant turn"),
    ("image in assistant turn", r"image in assistant turn \(message 2 has 1 image placeholder"),
]


@pytest.mark.parametrize("case,message", BAD, ids=[case for case, _ in BAD])
def test_bad_records_raise_errors_naming_file_and_record_or_are_counted(case, message, built, pipeline):
    processor, root = built["clip"][1], pipeline / "annotations"
    good = records(pipeline)[0]
    bad = _bad_record(case, good, root)
    with pytest.raises(RecordError, match=rf"^train.jsonl: record bad-{case}: {message}"):
        vlm.encode_vlm_records(processor, [good, bad], root, 512, where="train.jsonl")
    examples, counts = vlm.encode_vlm_records(processor, [good, bad], root, 512, skip_invalid=True)
    assert len(examples) == 1 and counts["kept"] == 1 and sum(v for k, v in counts.items() if "invalid" in k) == 1


def test_too_long_record_is_skipped_and_counted_or_an_error_counting_its_image_tokens(built, pipeline):
    processor, root = built["clip"][1], pipeline / "annotations"
    rec = records(pipeline)[0]
    full = vlm.encode_vlm_record(processor, rec, root, 1024)
    image_end = max(t for t, x in enumerate(full["input_ids"]) if x == processor.image_token_id) + 1
    first_label = next(t for t, y in enumerate(full["labels"]) if y != -100)
    n = full["length"]
    examples, counts = vlm.encode_vlm_records(processor, [rec], root, image_end - 5, overflow="skip")
    assert examples == [] and counts["skipped: longer than max_length"] == 1
    with pytest.raises(SkipRecord):
        vlm.encode_vlm_record(processor, rec, root, n - 1, overflow="skip")
    with pytest.raises(RecordError, match=rf"{rec['id']}: image tokens beyond max_length \({n} tokens incl. 64 image "
                                          rf"tokens > max_length {image_end - 5}: truncation would cut image tokens"):
        vlm.encode_vlm_records(processor, [rec], root, image_end - 5)
    with pytest.raises(RecordError, match="no supervised tokens after truncation"):
        vlm.encode_vlm_record(processor, rec, root, first_label)
    examples, counts = vlm.encode_vlm_records(processor, [rec], root, first_label + 3)
    assert counts == {"kept": 1, "truncated": 1} and examples[0]["length"] == first_label + 3
    assert examples[0]["input_ids"] == full["input_ids"][:first_label + 3]


# ---------------------------------------------------------------------------------------------------- batches
def test_mixed_image_and_text_batch_runs_through_llava_and_equals_each_row_alone(built, pipeline):
    from semivlm.loop import causal_lm_loss, supervised_tokens

    model, processor = built["siglip"]
    pad = processor.tokenizer.pad_token_id
    rows, counts = vlm.encode_vlm_records(processor, records(pipeline)[:2] + [text_record(
        "t1", "What does CMP remove?", "The copper overburden.", {})] + records(pipeline, "vqa")[2:3],
        pipeline / "annotations", 512)
    assert counts["kept"] == 4 and [r["has_image"] for r in rows] == [True, True, False, True]
    same_image, _ = vlm.encode_vlm_records(processor, [records(pipeline)[0], records(pipeline, "classify")[0]],
                                           pipeline / "annotations", 512)
    assert same_image[0]["pixel_values"] is same_image[1]["pixel_values"]  # one tensor per image, not per record
    batch = vlm.collate_vlm(rows, pad)
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["_n_images"] == 3
    assert batch["_n_tokens"] == sum(r["length"] for r in rows)
    with torch.no_grad():
        out = model(**inputs(batch))
        loss, _ = causal_lm_loss(model, batch, supervised_tokens(batch))  # as the training loop calls it
        # the loop's sum / tokens against transformers' mean: the same n_tok terms summed in another order
        assert float(loss) == pytest.approx(float(out.loss), rel=supervised_tokens(batch) * EPS32)
        logits = out.logits
        for b, row in enumerate(rows):  # images land in their own rows: each row's logits as if run alone
            alone = model(**inputs(vlm.collate_vlm([row], pad))).logits[0]
            # another batch shape reorders each layer's dot products (hidden + MLP width per layer) and the padding
            # changes the attention's softmax sums (row length)
            text = model.config.text_config
            depth = text.num_hidden_layers * (text.hidden_size + text.intermediate_size + row["length"])
            assert torch.allclose(logits[b, :row["length"]], alone, atol=fp32_sum_tol(depth, float(alone.abs().max())))
        text_only = vlm.collate_vlm([rows[2], rows[2]], pad)
        assert "pixel_values" not in text_only
        assert math.isfinite(float(model(**inputs(text_only)).loss))


def test_modality_grouped_order_is_a_deterministic_permutation_never_mixing_within_a_micro_batch():
    from semivlm.loop import StepBatches

    rng = np.random.default_rng(0)
    n, micro = 103, 4
    lengths, has_image = rng.integers(20, 400, n), rng.random(n) < 0.4
    perm = vlm.modality_length_grouped_permutation(lengths, has_image, micro, seed=1, epoch=0)
    assert sorted(perm.tolist()) == list(range(n))
    assert np.array_equal(perm, vlm.modality_length_grouped_permutation(lengths, has_image, micro, 1, 0))
    assert not np.array_equal(perm, vlm.modality_length_grouped_permutation(lengths, has_image, micro, 1, 1))
    # consumed as the loop consumes it: 2 ranks, grad_accum 3, three epochs back to back (n % micro != 0)
    cfg = SimpleNamespace(micro_batch_size=micro, grad_accum=3, seed=1)
    dataset = [{"i": i, "image": bool(has_image[i])} for i in range(n)]
    order = lambda epoch: vlm.modality_length_grouped_permutation(lengths, has_image, micro, 1, epoch)  # noqa: E731
    ranks = [StepBatches(dataset, lambda rows: rows, cfg, 2, r, order) for r in range(2)]
    batches = [b for step in range(3 * n // (micro * 3 * 2)) for r in ranks for b in r(step)]
    mixed = sum(len({row["image"] for row in b}) > 1 for b in batches)
    assert mixed <= 2 * 3  # per epoch: the partial groups' one batch and the one across the epoch boundary
    spread = np.mean([np.ptp([lengths[row["i"]] for row in b]) for b in batches])
    assert spread < 0.5 * np.mean([np.ptp(lengths[rng.permutation(n)[:micro]]) for _ in range(200)])

    grouped, shuffled = (vlm.token_share(lengths, order, micro) for order in (perm, rng.permutation(n)))
    assert shuffled < grouped <= 1.0


def test_token_share_counts_real_tokens_of_right_padded_micro_batches():
    assert vlm.token_share([10, 10, 20, 20], [0, 1, 2, 3], 2) == 1.0
    assert vlm.token_share([10, 10, 20, 20], [0, 2, 1, 3], 2) == pytest.approx(60 / 80)
    assert vlm.token_share([10, 30, 5], [2, 1, 0], 2) == pytest.approx(45 / (2 * 30 + 10))  # last batch partial


def test_image_dpo_pair_loss_is_log2_per_pair_against_its_own_reference(built, pipeline, tmp_path):
    from data_prep.make_instructions import preference_pairs
    from semivlm.dpo import attach_reference, make_dpo_loss, precompute_reference_logps

    model, processor = built["clip"]
    pad = processor.tokenizer.pad_token_id
    pairs = preference_pairs([], str(pipeline / "annotations"), tmp_path, seed=0)
    pairs = [p for p in pairs if p["meta"]["kind"] == "caption"][:2] + [p for p in pairs if p["images"]][-1:]
    rows, counts = vlm.encode_vlm_pairs(processor, pairs, tmp_path, 512, where="preferences.jsonl")
    assert counts == {"kept": 3}
    assert all(r["pixel_values"].shape == (1, 3, 64, 64) for r in rows)
    batch = vlm.collate_vlm_pairs(rows, pad)
    assert batch["pixel_values"].shape == (6, 3, 64, 64) and batch["_n_items"] == 3
    assert torch.equal(batch["pixel_values"][:3], batch["pixel_values"][3:])
    # reference one pair at a time: equal only if padding and image order in the batch of 3 are right
    attach_reference(rows, precompute_reference_logps(model, rows, lambda r: vlm.collate_vlm_pairs(r, pad), 1))
    loss, extras = make_dpo_loss(beta=0.1)(model, vlm.collate_vlm_pairs(rows, pad), 3)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-4) and abs(extras["rewards_margin"]) < 1e-3
    with pytest.raises(RecordError, match=r"preferences.jsonl: record .* \(chosen\): image count mismatch"):
        vlm.encode_vlm_pair(processor, {**pairs[0], "prompt": "<image> " + pairs[0]["prompt"]}, tmp_path, 512,
                            where="preferences.jsonl")
