"""export_gptq.py on tiny models the tests build: GPTQ W4A16 of a text LLM and of an upcycled MoE VLM (Llava around
a Mixtral) reloads with plain transformers, generates and barely moves its metric; the VLM keeps its vision tower,
projector and routers unquantised, names its experts as Mixtral checkpoints do (what transformers and vLLM read), and
every expert's scales are sound; bad input stops with a clear message."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from conftest import TINY_VISION

from semivlm import evaluation as ev
from semivlm import moe, vlm


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def moe_vlm_dir(llm_dir, tmp_path_factory) -> Path:
    """What train_moe.py --stage moe writes: the tiny Llava upcycled to 4 Mixtral experts, top-2. The experts are then
    made distinct and the routers decisive (as training makes them), so that a mixed-up expert would show."""
    model, processor = vlm.build_vlm(TINY_VISION["clip"], str(llm_dir))
    model = moe.upcycle(model.eval(), num_experts=4, top_k=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std())
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5, generator=g)
    path = tmp_path_factory.mktemp("moe_vlm") / "final"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.slow
def test_moe_vlm_gptq_export_reloads_with_transformers_and_keeps_every_expert(moe_vlm_dir, pipeline, tmp_path):
    from export_gptq import ExportConfig, main

    ann = pipeline / "annotations"
    out = tmp_path / "gptq"
    report = main(ExportConfig(model=str(moe_vlm_dir), output_dir=str(out), group_size=32, num_calibration_samples=8,
                               calibration=[str(ann / "captions.jsonl"), str(ann / "vqa.jsonl")],
                               eval_data=[str(ann / "classify.jsonl")], eval_split="train"))
    assert report["size_mb_quantised"] < report["size_mb_source"]
    # the reported answer is the published export's own greedy answer to the first held-out prompt
    reloaded, proc, is_vlm = ev.load_model(str(out))
    first = ev.read_records([str(ann / "classify.jsonl")], "train")[:1]
    assert report["reloaded_answer"] == ev.generate(reloaded, proc, is_vlm, first, max_new_tokens=16)[0]
    before, after = report["before"], report["after"]
    assert before["metric"] == "classification top-1" and before["n"] == after["n"] == 4
    assert abs(after["value"] - before["value"]) <= 0.25, (before, after)  # at most one of the 4 records changes

    # every expert (2 layers x 4 experts x gate/up/down) quantised with sound scales
    scales = json.loads((out / "expert_scales.json").read_text())
    assert len(scales) == report["experts_checked"] == 24 and all(s["ok"] for s in scales.values())
    assert all(0 < s["min"] < s["max"] for s in scales.values())

    # the checkpoint: experts in Mixtral's layout (what vLLM's Mixtral loader and transformers' conversion read),
    # vision tower/projector/routers as plain weights, and an ignore list that transformers' module names match too
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.1.block_sparse_moe.experts.3.w1.weight_packed" in keys
    assert {k.rsplit(".", 2)[-2] for k in keys if ".experts." in k} == {"w1", "w2", "w3"}
    assert not [k for k in keys if ("vision_tower" in k or "projector" in k or ".gate." in k) and "weight_packed" in k]
    config = json.loads((out / "config.json").read_text())
    assert "model.multi_modal_projector.linear_1" in config["quantization_config"]["ignore"]
    assert config["text_config"]["architectures"] == ["MixtralForCausalLM"]

    # reloaded with plain transformers: unquantised parts exact, every expert its own weights within 4-bit error
    source, processor, _ = ev.load_model(str(moe_vlm_dir))
    quant, _, _ = ev.load_model(str(out))
    src, got = source.state_dict(), quant.state_dict()
    for name in [k for k in src if "vision_tower" in k or "multi_modal_projector" in k or "mlp.gate." in k]:
        assert torch.equal(src[name], got[name]), name
    for layer in range(2):
        for part in ("gate_up_proj", "down_proj"):
            key = f"model.language_model.layers.{layer}.mlp.experts.{part}"
            for e in range(4):
                err = relative_error(got[key][e], src[key][e])
                assert err < 0.2, (key, e, err)  # int4, groups of 32: ~0.1
                assert err < 0.3 * relative_error(got[key][e], src[key][(e + 1) % 4]), (key, e)  # not another's

    # same outputs within quantisation error: logits on a calibration sample, answer perplexity on the VQA records
    ex = vlm.encode_vlm_record(processor, json.loads((ann / "captions.jsonl").read_text().splitlines()[0]), ann, 512)
    ids = torch.tensor([ex["input_ids"]])
    with torch.no_grad():
        a = source(input_ids=ids, pixel_values=ex["pixel_values"]).logits
        b = quant(input_ids=ids, pixel_values=ex["pixel_values"]).logits
        generated = quant.generate(input_ids=ids, pixel_values=ex["pixel_values"], max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False)
    assert relative_error(b, a) < 0.2 and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.85
    assert generated.shape[1] == ids.shape[1] + 4
    vqa = ev.read_records([str(ann / "vqa.jsonl")])
    ppl_before = ev.answer_perplexity(source, processor, True, vqa)["perplexity"]
    ppl_after = ev.answer_perplexity(quant, processor, True, vqa)["perplexity"]
    print(f"MoE VLM W4A16: {report['size_mb_source']:.2f} -> {report['size_mb_quantised']:.2f} MB, top-1 "
          f"{before['value']:.2f} -> {after['value']:.2f}, VQA answer perplexity {ppl_before:.2f} -> {ppl_after:.2f}")
    assert abs(ppl_after - ppl_before) / ppl_before < 0.05, (ppl_before, ppl_after)


@pytest.mark.slow
def test_text_llm_gptq_export_reloads_generates_and_keeps_perplexity_close(llm_dir, pipeline, tmp_path):
    from export_gptq import ExportConfig, main

    records = [json.loads(x) for x in (pipeline / "annotations/vqa.jsonl").read_text().splitlines()]
    text = tmp_path / "text.jsonl"  # the VQA conversations without their images: text calibration and held-out data
    with open(text, "w") as f:
        for r in records:
            msgs = [{"role": m["role"], "content": " ".join(p.get("text", "") for p in m["content"])} for m in r["messages"]]
            f.write(json.dumps({"id": r["id"], "messages": msgs, "meta": {"split": "train"}}) + "\n")
    report = main(ExportConfig(model=str(llm_dir), output_dir=str(tmp_path / "gptq"), calibration=[str(text)],
                               num_calibration_samples=8, group_size=32, eval_data=[str(text)], eval_split="train"))
    assert report["size_mb_quantised"] < report["size_mb_source"]
    config = json.loads((tmp_path / "gptq/config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    before, after = report["before"]["value"], report["after"]["value"]
    print(f"text LLM W4A16: {report['size_mb_source']:.2f} -> {report['size_mb_quantised']:.2f} MB, "
          f"perplexity {before:.3f} -> {after:.3f}")
    assert abs(after - before) / before < 0.1, (before, after)
    # the reported answer is the published export's own greedy answer to the first held-out prompt
    reloaded, proc, is_vlm = ev.load_model(str(tmp_path / "gptq"))
    assert not is_vlm
    first = ev.read_records([str(text)], "train")[:1]
    assert report["reloaded_answer"] == ev.generate(reloaded, proc, is_vlm, first, max_new_tokens=16)[0]


def test_gptq_refuses_a_group_size_that_does_not_divide_and_a_calibration_without_records(llm_dir, tmp_path):
    from export_gptq import ExportConfig, main

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"}], "meta": {"split": "train"}}) + "\n")
    with pytest.raises(SystemExit, match="use --group_size 64"):
        main(ExportConfig(model=str(llm_dir), output_dir=str(tmp_path / "x"), calibration=[str(empty)], group_size=128 * 3))
    with pytest.raises(SystemExit, match="no usable records"):
        main(ExportConfig(model=str(llm_dir), output_dir=str(tmp_path / "x"), calibration=[str(empty)], group_size=32))
