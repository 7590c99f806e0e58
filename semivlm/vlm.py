"""The VLM: a plain `transformers` LlavaForConditionalGeneration (CLIP or SigLIP tower, LLaVA-1.5's projector
linear · GELU · linear, any decoder LLM); robust image loading; records encoded with verified labels; batches.

* Records go through semivlm.chat.encode_chat, so they get its checks (roles, missing/empty assistant turns, labels
  only on assistant text): each typed image part becomes the literal `<image>` in a string message, exactly as the
  processor's chat template renders it, and that one token is then expanded to the processor's number of image
  tokens (labels -100). tests/test_vlm.py checks the result equals `processor(text=..., images=...)`.
* Images are padded to a square with the normalisation mean (LLaVA-1.5's "pad" mode), so the processor's centre crop
  never cuts content away; >8-bit data gets data_prep/ingest.py's percentile window.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch

from semivlm.chat import (SkipRecord, collate_chat, encode_chat, encode_counted, end_of_turn_ids,
                          length_grouped_permutation, named_error, normalise_messages, record_error)
from semivlm.data import RecordError

IMAGE_TOKEN = "<image>"
MIN_SIDE = 8
# strategy, CLS tokens the processor counts, feature layer: CLIP drops its CLS and, like LLaVA-1.5, reads the
# penultimate layer; SigLIP has no CLS and uses every patch of its last layer (as LLaVA-OneVision does)
VISION_KINDS = {"clip": ("default", 1, -2), "siglip": ("full", 0, -1)}
KIND = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
DEFAULT_NORM = {"clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])}
# typed parts -> one string per message ("<image>" per image part, parts joined by "\n", as the debug ChatML template
# does), then the LLM's own template: so any LLM template works and renders what encode_vlm_record encodes
TYPED_TO_STRING = (
    "{%- set _vlm = namespace(messages=[]) -%}{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set _c = m['content'] -%}{%- else -%}{%- set _p = namespace(items=[]) -%}"
    "{%- for part in m['content'] -%}{%- if part['type'] == 'image' -%}{%- set _p.items = _p.items + ['<image>'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set _p.items = _p.items + [part['text']] -%}{%- endif -%}{%- endfor -%}"
    "{%- set _c = _p.items | join('\\n') -%}{%- endif -%}"
    "{%- set _vlm.messages = _vlm.messages + [{'role': m['role'], 'content': _c}] -%}{%- endfor -%}"
    "{%- set messages = _vlm.messages -%}")


# ------------------------------------------------------------------------------------------------------ model
def _vision_tower(vision, image_size, dtype, attn):
    """(tower, kind, image mean, image std): a tiny random tower from a dict, else the vision part of a CLIP/SigLIP
    checkpoint (a vision-only one or a full two-tower one) with its own normalisation when it ships one."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel
    from transformers.image_processing_base import ImageProcessingMixin

    if isinstance(vision, dict):
        spec = {**vision, **({"image_size": image_size} if image_size else {})}
        model_type = spec.pop("model_type", None)
        if model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise ValueError(f"vision config: model_type must be clip_vision_model or siglip_vision_model, not "
                             f"{model_type!r}")
        tower = AutoModel.from_config(AutoConfig.for_model(model_type, **spec), dtype=dtype, attn_implementation=attn)
        return tower, KIND[model_type], *DEFAULT_NORM[KIND[model_type]]
    kind = KIND.get(model_type := AutoConfig.from_pretrained(vision).model_type)
    if kind is None:
        raise ValueError(f"{vision}: a {model_type!r} model; the vision tower must be CLIP or SigLIP")
    cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    tower, info = cls.from_pretrained(vision, dtype=dtype, attn_implementation=attn, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:  # random weights in a "pretrained" tower: refuse
        raise ValueError(f"{vision}: vision weights missing or mismatched: "
                         f"{sorted(info['missing_keys'])[:5]} {info['mismatched_keys'][:5]}")
    if image_size and image_size != tower.config.image_size:
        raise ValueError(f"{vision}: image_size {image_size} differs from the tower's {tower.config.image_size} "
                         "(its position embeddings are trained for that size)")
    mean, std = DEFAULT_NORM[kind]
    try:  # the checkpoint's normalisation (its preprocessor_config.json), else the family's defaults
        saved = ImageProcessingMixin.get_image_processor_dict(vision)[0]
        mean, std = saved.get("image_mean", mean), saved.get("image_std", std)
    except (OSError, ValueError):
        pass
    return tower, kind, mean, std


def image_processor(kind: str, size: int, mean, std):
    """CLIP: resize the short side + centre crop; SigLIP: resize to size×size. Our images arrive square already.
    The torchvision backend when installed, else the PIL one (same class name in the saved config)."""
    import importlib.util

    import transformers

    name = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}[kind]
    cls = getattr(transformers, name if importlib.util.find_spec("torchvision") else name + "Pil")
    square = {"height": size, "width": size}
    sizes = {"size": {"shortest_edge": size}, "crop_size": square} if kind == "clip" else {"size": square}
    return cls(**sizes, image_mean=mean, image_std=std)


def vision_layers(tower) -> int:
    return tower.config.num_hidden_layers


def build_vlm(vision, llm: str, dtype=torch.float32, image_size: int | None = None, attn_implementation: str = "sdpa",
              feature_layer: int = 0, feature_strategy: str = ""):
    """(LlavaForConditionalGeneration, LlavaProcessor) from a vision tower (CLIP/SigLIP dir or hub id, or a tiny
    config dict) and an LLM directory (AutoModelForCausalLM + its tokenizer with a chat template). The LLM's and the
    tower's weights are copied exactly (strict keys); the projector is random. feature_layer (0 = the family's, CLIP
    -2 as LLaVA, SigLIP -1) and feature_strategy ("" = the family's; "full" keeps CLIP's class token, "default" drops
    it) choose what the projector reads: a tower trained for classification here carries its class in the last
    layer's class token, which LLaVA's pick for web-pretrained CLIP would throw away."""
    from transformers import AddedToken, AutoModelForCausalLM, AutoModelForImageTextToText, LlavaConfig, LlavaProcessor

    from transformers.integrations import is_deepspeed_zero3_enabled

    from semivlm.model import load_tokenizer

    if is_deepspeed_zero3_enabled():  # partitioned parameters are empty placeholders: nothing to copy
        raise RuntimeError("build_vlm copies weights between models and cannot run under ZeRO-3 partitioning: "
                           "build it inside semivlm.checkpoint.unpartitioned(), save it, then load_vlm the directory")
    tower, kind, mean, std = _vision_tower(vision, image_size, dtype, attn_implementation)
    strategy, n_extra, layer = VISION_KINDS[kind]
    layer, strategy = feature_layer or layer, feature_strategy or strategy
    if strategy not in ("default", "full") or not -vision_layers(tower) <= layer <= vision_layers(tower):
        raise SystemExit(f"vision feature layer {layer} / strategy '{strategy}': the layer must lie within the tower's "
                         f"{vision_layers(tower)} (negative counts from the last) and the strategy be default or full")
    tok = load_tokenizer(llm)
    if not tok.chat_template:
        raise SystemExit(f"{llm}: the tokenizer has no chat template; the VLM's records are conversations")
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    lm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, attn_implementation=attn_implementation)
    if lm.get_input_embeddings().num_embeddings < len(tok):  # spare rows (e.g. Qwen's padded vocab) are kept
        lm.resize_token_embeddings(len(tok))
    vc = tower.config
    n_tokens = (vc.image_size // vc.patch_size) ** 2 + n_extra - (strategy == "default")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(vision_config=vc, text_config=lm.config, image_token_index=image_id, image_seq_length=n_tokens,
                         projector_hidden_act="gelu", vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy, tie_word_embeddings=lm.config.tie_word_embeddings)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    model.model.language_model.load_state_dict(lm.base_model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict(), strict=True)
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tok.pad_token_id
    template = tok.chat_template if tok.chat_template.startswith(TYPED_TO_STRING) else \
        TYPED_TO_STRING + tok.chat_template  # (an LLM dir written from a VLM already has the conversion)
    processor = LlavaProcessor(image_processor=image_processor(kind, vc.image_size, mean, std), tokenizer=tok,
                               patch_size=vc.patch_size, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=n_extra, chat_template=template)
    return model, processor


def load_vlm(path: str, dtype=torch.float32, attn_implementation: str = "sdpa", strict: bool = False):
    """(model, processor) of a saved VLM directory: plain AutoModelForImageTextToText + AutoProcessor. strict: an
    error when a checkpoint tensor finds no weight or a weight no tensor (see refuse_unmatched)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    # Import the decoder's modelling code before from_pretrained: classes first defined inside a ZeRO-3 zero.Init
    # lose transformers' __init__ wrapper when zero.Init unpatches them, and every later MoE build in this process
    # fails ("'MixtralExperts' object has no attribute 'config'"), e.g. the classification check after a resume
    family = AutoConfig.from_pretrained(path).text_config.model_type
    importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                              output_loading_info=True)
    if strict:
        refuse_unmatched(path, info)
    return model, AutoProcessor.from_pretrained(path)


def refuse_unmatched(path, info: dict) -> None:
    """Raise when from_pretrained's loading info lists missing, unexpected or mismatched keys: a naming mismatch
    would otherwise leave randomly initialised weights behind without a word."""
    bad = {k: sorted(info.get(k) or [])[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
           if info.get(k)}
    if bad:
        raise RuntimeError(f"{path}: checkpoint names do not match the model: {bad}")


def is_vlm_dir(path) -> bool:
    """True for a saved Llava directory (vision tower inside), False for a plain LLM directory or anything else."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------- images
def _to_uint8(a: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    """>8-bit data -> uint8 by a robust percentile window, as data_prep/ingest.py maps microscope files (the window
    there sits inside its tiling generator, and semivlm must not import the data-prep scripts)."""
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)] if np.isfinite(a).any() else np.zeros(1)
    lo, hi = np.percentile(finite, percentiles)
    lo, hi = (lo, hi) if hi > lo else (finite.min(), finite.max() + 1e-12)  # constant image: all black
    return np.nan_to_num(np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255), nan=0).astype(np.uint8)


def image_fill(processor) -> tuple:
    """LLaVA-1.5's padding colour: the normalisation mean, so padding becomes ~0 after normalising."""
    return tuple(int(round(255 * m)) for m in processor.image_processor.image_mean)


def load_image(path, record_id: str = "", max_aspect_ratio: float = 5.0, fill=(128, 128, 128)):
    """An RGB PIL image padded to a square with `fill` (pass image_fill(processor) to match training), from any
    PIL-readable file: 1-bit/L/16-bit/32-bit/float grayscale, palette, RGBA/LA, CMYK. RecordError naming record and
    path when missing, undecodable, under 8 px a side or more elongated than max_aspect_ratio."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise record_error(record_id, "image not found", str(path))
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not in the middle of a training step
            im = im.copy()
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError/ValueError (broken chunks)
        raise record_error(record_id, "image does not decode", f"{path}: {type(e).__name__}: {e}") from None
    w, h = im.size
    _check_size(path, w, h, record_id, max_aspect_ratio)
    if im.mode in ("I", "F") or im.mode.startswith("I;"):  # 16/32-bit integer or float grayscale
        im = Image.fromarray(_to_uint8(np.asarray(im)))
    if im.mode == "P":  # palette: may carry transparency, resolved below
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # alpha is composited on black: in a micrograph transparent = outside the field = no signal, and black
        # is what the detector shows there (white would read as a saturated, charging region)
        rgba = im.convert("RGBA")
        im = Image.new("RGB", im.size, (0, 0, 0))
        im.paste(rgba, mask=rgba.getchannel("A"))
    im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV -> RGB (grayscale repeated in the three channels)
    if w != h:  # LLaVA-1.5 "pad": the whole image survives the processor's resize + centre crop
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(fill))
        square.paste(im, ((side - w) // 2, (side - h) // 2))
        im = square
    return im


def _check_size(path, w: int, h: int, record_id: str, max_aspect_ratio: float) -> None:
    if min(w, h) < MIN_SIDE:
        raise record_error(record_id, "image too small", f"{path}: {w}x{h} < {MIN_SIDE} px a side")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise record_error(record_id, "extreme aspect ratio",
                           f"{path}: {w}x{h} is more than {max_aspect_ratio}:1; padded to a "
                           "square its content would shrink to a sliver (crop or tile it, or raise max_aspect_ratio)")


def image_header(path, record_id: str = "", max_aspect_ratio: float = 5.0) -> tuple[int, int]:
    """(width, height) from the file's header only (PIL opens lazily: no pixel is decoded), with load_image's checks
    that the header can answer: missing, not an image (a zero-byte file), too small, too elongated. A file whose
    pixels are broken (a truncated PNG) passes here and is caught when it is decoded, per micro-batch."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise record_error(record_id, "image not found", str(path))
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # UnidentifiedImageError (zero bytes, not an image), OSError
        raise record_error(record_id, "image does not decode", f"{path}: {type(e).__name__}: {e}") from None
    _check_size(path, w, h, record_id, max_aspect_ratio)
    return w, h


def blank_pixel_values(processor) -> torch.Tensor:
    """[1, 3, H, W]: the processor's output for an image of the padding colour (≈0 after normalising), the shape and
    token count of every image the processor makes (our images are square before resizing). Stands in for an image
    that fails to decode at train time under skip_invalid, and for the blind image of a text-only micro-batch."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), image_fill(processor))  # resized (and cropped) to the tower's size
    return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def image_tokens_per_image(processor, pixel_values: torch.Tensor) -> int:
    """Image tokens the processor expands one `<image>` into, for images of pixel_values' size (as
    LlavaProcessor.replace_image_token computes it)."""
    h, w = pixel_values.shape[-2:]
    n = (h // processor.patch_size) * (w // processor.patch_size) + processor.num_additional_image_tokens
    return n - (processor.vision_feature_select_strategy == "default")


def load_pixel_values(processor, paths: list[str], image_root, record_id: str, max_aspect_ratio: float, cache):
    """[n_img, 3, H, W] for the record's images; `cache` (path -> tensor) shares the tensor of an image that several
    records (caption, VQA, class) use."""
    cache, out = {} if cache is None else cache, []
    for p in paths:
        full = Path(image_root or ".") / p
        key = str(full.resolve())
        if key not in cache:
            image = load_image(full, record_id, max_aspect_ratio, image_fill(processor))
            cache[key] = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]  # [1,3,H,W]
        out.append(cache[key])
    return out[0] if len(out) == 1 else torch.cat(out)  # one image: the cached tensor itself, not a copy


# ---------------------------------------------------------------------------------------------------- records
def _string_messages(messages, record_id: str):
    """Typed content -> strings with "<image>" at each image part (parts joined by "\\n", as the processor's
    template renders them); other content is left for chat.normalise_messages to judge. Returns (messages, number
    of placeholders); an `<image>` in an assistant turn is an error (its tokens would be labels)."""
    if not isinstance(messages, list):
        return messages, 0
    out, n = [], 0
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and (p.get("type") == "image" or (
                p.get("type") == "text" and isinstance(p.get("text"), str))) for p in content):
            content = "\n".join(IMAGE_TOKEN if p["type"] == "image" else p["text"] for p in content)
        if isinstance(content, str):
            k = content.count(IMAGE_TOKEN)
            if k and m.get("role") == "assistant":
                raise record_error(record_id, "image in assistant turn",
                                   f"message {i + 1} has {k} image placeholder(s)")
            n += k
            m = {**m, "content": content}
        out.append(m)
    return out, n


def _fit(record_id: str, ids: list, labels: list, image_id: int, n_image_tokens: int, max_length: int, overflow: str):
    """Cut to max_length, but never through image tokens (Llava needs all of an image's tokens) and never down to
    zero labels: then SkipRecord with overflow="skip", RecordError with "truncate"."""
    if len(ids) <= max_length:
        return ids, labels
    if overflow == "skip":
        raise SkipRecord("longer than max_length", record_id)
    detail = f"{len(ids)} tokens incl. {n_image_tokens} image tokens > max_length {max_length}"
    image_end = max((t + 1 for t, x in enumerate(ids) if x == image_id), default=0)
    if image_end > max_length:
        raise record_error(record_id, "image tokens beyond max_length", f"{detail}: truncation would cut image tokens "
                           "(raise max_length or use overflow='skip')")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels):
        raise record_error(record_id, "no supervised tokens after truncation", detail)
    return ids, labels


def _encode(processor, messages, images, record_id, image_root, max_length, overflow, max_aspect_ratio, cache,
            lazy=False):
    """(example without id, untruncated length): chat.encode_chat on string messages, checked against the images,
    then each `<image>` token expanded to the processor's count with labels -100. lazy: no pixel is decoded; the
    example holds the images' resolved paths and header sizes instead ("images", "image_sizes"; pixel_values None),
    and `cache` maps path -> size."""
    if overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow must be 'truncate' or 'skip', not {overflow!r}")
    images = [] if images is None else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise record_error(record_id, "bad images", "'images' must be a list of image paths")
    msgs, n_placeholders = _string_messages(messages, record_id)
    normalise_messages(msgs, record_id)  # a conversation's own faults first (no messages, roles ...), then images
    if n_placeholders != len(images):
        raise record_error(record_id, "image count mismatch",
                           f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) in the messages "
                           f"for {len(images)} image(s)")
    enc = encode_chat(processor.tokenizer, msgs, 1 << 30, record_id)  # whole conversation: cut after expansion
    ids, labels, image_id = enc["input_ids"], enc["labels"], processor.image_token_id
    if ids.count(image_id) != len(images):  # a template that drops or repeats user content
        raise record_error(record_id, "image count mismatch", f"the chat template renders {ids.count(image_id)} image "
                           f"token(s) for {len(images)} image(s)")
    pixel_values, per_image, paths, sizes = None, 0, [], []
    if images and lazy:
        cache = {} if cache is None else cache
        if None not in cache:  # every image becomes the processor's one size: its token count, computed once
            cache[None] = image_tokens_per_image(processor, blank_pixel_values(processor))
        per_image = cache[None]
        for p in images:
            full = str((Path(image_root or ".") / p).resolve())
            if full not in cache:
                cache[full] = image_header(full, record_id, max_aspect_ratio)
            paths.append(full)
            sizes.append(list(cache[full]))
    elif images:
        pixel_values = load_pixel_values(processor, images, image_root, record_id, max_aspect_ratio, cache)
        per_image = image_tokens_per_image(processor, pixel_values)
    if images:
        expanded_ids, expanded_labels = [], []
        for t, y in zip(ids, labels):
            expanded_ids += [t] * (per_image if t == image_id else 1)
            expanded_labels += [-100] * per_image if t == image_id else [y]
        ids, labels = expanded_ids, expanded_labels
    n_full = len(ids)
    ids, labels = _fit(record_id, ids, labels, image_id, per_image * len(images), max_length, overflow)
    lazy_keys = {"images": paths, "image_sizes": sizes} if lazy else {}
    return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "n_images": len(images),
            "length": len(ids), "has_image": bool(images), **lazy_keys}, n_full


def _record(processor, rec, n, image_root, max_length, overflow, max_aspect_ratio, cache, lazy=False):
    """(id, example, untruncated length) of the n-th record of a file."""
    rid = str(rec.get("id")) if isinstance(rec, dict) and rec.get("id") not in (None, "") else f"#{n}"
    if not isinstance(rec, dict):
        raise record_error(rid, "not an object", f"got {type(rec).__name__}")
    return rid, *_encode(processor, rec.get("messages"), rec.get("images"), rid, image_root, max_length, overflow,
                         max_aspect_ratio, cache, lazy)


def encode_vlm_record(processor, record: dict, image_root, max_length: int, overflow: str = "truncate", where: str = "",
                      max_aspect_ratio: float = 5.0, cache: dict | None = None) -> dict:
    """One multimodal (or text-only) record -> {"id", "input_ids", "labels", "pixel_values" [n_img,3,H,W] or None,
    "n_images", "length", "has_image"}. Image paths are relative to image_root (the JSONL file's directory). Bad
    records raise RecordError naming `where` and the record; too long with overflow="skip" raises SkipRecord."""
    try:
        rid, example, _ = _record(processor, record, 1, image_root, max_length, overflow, max_aspect_ratio, cache)
        return {"id": rid, **example}
    except RecordError as e:
        raise named_error(e, where) from None


def encode_vlm_records(processor, records, image_root, max_length: int, overflow: str = "truncate",
                       skip_invalid: bool = False, where: str = "", max_aspect_ratio: float = 5.0, lazy: bool = False):
    """(examples, counts) as chat.encode_records: counts["kept"], ["truncated"], ["skipped: <reason>"],
    ["invalid: <reason>"] (only with skip_invalid; otherwise the first bad record raises RecordError naming `where`
    and the record). Records of one image share one pixel tensor; lazy: no pixels, image paths and header sizes
    (semivlm.record_index decodes them per micro-batch)."""
    cache = {}

    def encode_one(rec, n):
        rid, example, n_full = _record(processor, rec, n, image_root, max_length, overflow, max_aspect_ratio, cache,
                                       lazy)
        return {"id": rid, **example}, n_full > max_length

    return encode_counted(records, encode_one, skip_invalid, where)


def encode_vlm_pair(processor, record: dict, image_root, max_length: int, where: str = "", overflow: str = "truncate",
                    max_aspect_ratio: float = 5.0, cache: dict | None = None, lazy: bool = False) -> dict:
    """A preference record {"id", "images", "prompt", "chosen", "rejected"} -> dpo.encode_pair's keys plus
    "pixel_values" (None without images), "n_images", "has_image". One `<image>` per image goes before the prompt.
    lazy: "images" and "image_sizes" instead of pixels, as encode_vlm_records."""
    rid = record.get("id") if isinstance(record, dict) else None
    name = f"{where + ': ' if where else ''}preference pair {rid!r}"
    if not isinstance(record, dict) or not isinstance(rid, str) or not rid:
        raise RecordError(f"{name}: a preference record needs a non-empty string 'id'")
    for key in [k for k in ("prompt", "chosen", "rejected") if not str(record.get(k) or "").strip()
                or not isinstance(record[k], str)]:
        raise RecordError(f"{name}: '{key}' is {'missing' if record.get(key) is None else 'empty or not a string'}")
    if record["chosen"].strip() == record["rejected"].strip():
        raise RecordError(f"{name}: 'chosen' and 'rejected' are the same text: nothing to prefer")
    images = record.get("images") or []
    user = [{"type": "image"}] * (len(images) if isinstance(images, list) else 0) + \
           [{"type": "text", "text": record["prompt"]}]
    cache = {} if cache is None else cache  # the images are read once for both sides
    out = {"id": rid}
    for side in ("chosen", "rejected"):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record[side]}]
        try:
            enc, _ = _encode(processor, messages, images, f"{rid} ({side})", image_root, max_length, overflow,
                             max_aspect_ratio, cache, lazy)
        except RecordError as e:
            raise named_error(e, where) from None
        out.update({f"{side}_input_ids": enc["input_ids"], f"{side}_labels": enc["labels"], "pixel_values":
                    enc["pixel_values"], "n_images": enc["n_images"], "has_image": enc["has_image"],
                    **{k: enc[k] for k in ("images", "image_sizes") if k in enc}})
    if out["chosen_input_ids"] == out["rejected_input_ids"]:
        raise RecordError(f"{name}: chosen and rejected encode identically within max_length={max_length}: "
                          "nothing to prefer")
    return out


def encode_vlm_pairs(processor, records, image_root, max_length: int, overflow: str = "truncate",
                     skip_invalid: bool = False, where: str = "", max_aspect_ratio: float = 5.0):
    """(encoded pairs, counts) for a file of preference records, counted like encode_vlm_records (no "truncated")."""
    cache = {}

    def encode_one(rec, n):  # encode_vlm_pair names `where` itself
        return encode_vlm_pair(processor, rec, image_root, max_length, where, overflow, max_aspect_ratio, cache), False

    return encode_counted(records, encode_one, skip_invalid, count_truncated=False)


@torch.no_grad()
def generate_answer(model, processor, record: dict, image_root, max_new_tokens: int = 64,
                    max_aspect_ratio: float = 5.0) -> str:
    """Greedy answer to a record's conversation without its last assistant turn (the reference), its images
    prepared exactly as in training."""
    rid, messages = str(record.get("id", "")), list(record["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    images = [load_image(Path(image_root or ".") / p, rid, max_aspect_ratio, image_fill(processor))
              for p in record.get("images") or []]
    if _string_messages(messages, rid)[1] != len(images):
        raise record_error(rid, "image count mismatch",
                           f"{len(images)} image(s) and a different number of placeholders")
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = processor(text=text, images=images or None, return_tensors="pt", add_special_tokens=False).to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id,
                         eos_token_id=end_of_turn_ids(processor.tokenizer))
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------- batches
def collate_vlm(rows: list[dict], pad_id: int) -> dict:
    """chat.collate_chat (right padding, attention_mask, labels -100 on padding, `_n_tokens`) plus `pixel_values`:
    the rows' images concatenated in row order (Llava fills the image tokens in that order), absent when no row has
    an image. Text-only rows may sit in the same batch as image rows. `_n_images` counts the images."""
    batch = collate_chat([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad_id)
    pixels = [r["pixel_values"] for r in rows if r.get("pixel_values") is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    batch["_n_images"] = sum(len(p) for p in pixels)
    return batch


def collate_vlm_pairs(rows: list[dict], pad_id: int) -> dict:
    """dpo.collate_pairs (2B rows: chosen first, rejected last) plus `pixel_values` for those 2B rows: the chosen
    rows' images, then the same images again for the rejected rows."""
    from semivlm.dpo import collate_pairs

    batch = collate_pairs(rows, pad_id)
    pixels = [r["pixel_values"] for r in rows if r.get("pixel_values") is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels + pixels)
    return batch


def add_blind_image(batch: dict, pixel_values: torch.Tensor, image_token_id: int, n_tokens: int, pad_id: int) -> dict:
    """Give an image-free batch one image that changes nothing: its tokens go after the end of row 0 with
    attention_mask 0 and labels -100, so (right padding, causal attention) no real token sees them and no loss
    falls on them. Why: under ZeRO-3 the vision tower's weights are gathered by a collective that every rank must
    join; a rank whose micro-batch has no image would skip it while the others wait (a hang)."""
    if batch.get("pixel_values") is not None:
        return batch
    rows = batch["input_ids"].shape[0]
    ids = torch.full((rows, n_tokens), pad_id, dtype=batch["input_ids"].dtype)
    ids[0] = image_token_id
    batch["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros_like(ids)], 1)
    batch["labels"] = torch.cat([batch["labels"], torch.full_like(ids, -100)], 1)
    batch["pixel_values"] = pixel_values
    return batch


def token_share(lengths: list[int], order, micro_batch_size: int) -> float:
    """Share of the right-padded micro-batches (consecutive micro_batch_size positions of `order`) that is real
    tokens rather than padding: what padding-free packing could at most win back."""
    lengths = np.asarray(lengths, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
    batches = [lengths[i:i + micro_batch_size] for i in range(0, len(lengths), micro_batch_size)]
    return float(lengths.sum() / max(1, sum(len(b) * b.max() for b in batches)))


def modality_length_grouped_permutation(lengths: list[int], has_image: list[bool], micro_batch_size: int, seed: int,
                                        epoch: int, mega_batch: int = 50) -> np.ndarray:
    """LLaVA's group_by_modality_length: a permutation of range(len(lengths)) whose micro-batches (consecutive
    micro_batch_size positions, as semivlm.loop consumes them) are all-image or all-text and of similar lengths
    (chat.length_grouped_permutation within each modality), the groups of both modalities shuffled together;
    deterministic per (seed, epoch). The partial groups of the two modalities go last, so at most one micro-batch
    per epoch mixes them, plus the one that straddles the epoch boundary. The loop runs epochs back to back, so
    epoch e's micro-batches start at index (-e * n) % micro_batch_size: the order is rotated to match."""
    lengths, has_image = np.asarray(lengths, dtype=np.int64), np.asarray(has_image, dtype=bool)
    if lengths.shape != has_image.shape:
        raise ValueError(f"{len(lengths)} lengths but {len(has_image)} has_image flags")
    m = micro_batch_size
    groups, leftovers = [], []
    for k, idx in enumerate((np.flatnonzero(has_image), np.flatnonzero(~has_image))):
        order = idx[length_grouped_permutation(lengths[idx], m, 2 * seed + k, epoch, mega_batch)] if len(idx) else idx
        n_full = len(order) // m * m
        groups += list(order[:n_full].reshape(-1, m))
        leftovers.append(order[n_full:])
    shuffled = [groups[i] for i in np.random.default_rng((seed, epoch, 7)).permutation(len(groups))]
    order = np.concatenate(shuffled + leftovers).astype(np.int64)
    return np.roll(order, (-epoch * len(order)) % m) if len(order) else order


def unused_vision_parameters(model) -> set[str]:
    """Vision-tower weights that never reach the LLM: the layers after `vision_feature_layer` (LLaVA takes CLIP's
    penultimate layer) and the final norm/head. Left frozen, or they would sit in the optimizer with no gradient."""
    layer = model.config.vision_feature_layer
    n_layers = model.config.vision_config.num_hidden_layers
    if not isinstance(layer, int):
        return set()
    last_used = layer % (n_layers + 1)  # hidden_states[0] is the embedding output, [k] the output of layer k-1
    out = set()
    for name, _ in model.named_parameters():
        if "vision_tower" not in name:
            continue
        parts = name.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) >= last_used:
            out.add(name)
        elif any(k in name for k in ("post_layernorm", ".head.")):
            out.add(name)
    return out


def blind_image_collate(collate, pixel_values: torch.Tensor, n_tokens: int, image_token_id: int, pad_id: int,
                        rows: list[dict]) -> dict:
    """`collate`, then, for a micro-batch without images, one image no token attends to (add_blind_image)."""
    return add_blind_image(collate(rows), pixel_values, image_token_id, n_tokens, pad_id)
