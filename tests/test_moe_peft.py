"""Parameter-efficient MoE stage (issue 20): expert LoRA with dropout on per-expert Linears and live routers, QLoRA
(nf4) for the llm and moe stages, the export back to plain Mixtral weights, and the settings that cannot run."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from conftest import fp32_sum_tol, reset_accelerate
from safetensors.torch import load_file
from test_train_moe import args_for, run_stage, vlm_inputs  # noqa: F401  (vlm_inputs is a fixture)

import train_moe
from semivlm import moe
from semivlm.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_moe(family: str = "llama", seed: int = 0):
    """A tiny upcycled MoE causal LM with routers and experts perturbed, so that routing and experts differ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {"head_dim": 16} if family == "qwen3" else {}
    config = AutoConfig.for_model(family, vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, **extra)
    model = moe.upcycle(AutoModelForCausalLM.from_config(config), num_experts=4, top_k=2, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_()
            elif ".experts." in name:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_unfused_experts_compute_the_fused_forward_and_fuse_back_to_the_same_weights(family):
    model = tiny_moe(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        fused = model(ids).logits
        assert moe.unfuse_experts(model) == 2
        assert any(re.search(r"experts\.3\.down_proj\.weight$", n) for n, _ in model.named_parameters())
        unfused = model(ids).logits
        # per expert the same dot products, maybe blocked differently: sums of H (gate/up) and I (down) terms per
        # layer, through two layers; bound on the logits from the fp32 summation error of those sums
        tol = fp32_sum_tol(2 * (64 + 96), float(fused.abs().max()))
        assert (unfused - fused).abs().max() <= tol
        assert moe.fuse_experts(model) == 2
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_nf4_quantises_the_decoder_linears_only_and_counts_their_bytes():
    model = tiny_moe()
    full = moe.parameter_bytes(model)
    moe.unfuse_experts(model)
    moe.check_nf4("cpu")
    n = moe.quantize_nf4(model, "cpu")
    assert n == 2 * (4 + 4 * 3)  # per layer q/k/v/o and 4 experts × gate/up/down
    import bitsandbytes as bnb

    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["model.layers.0.mlp.experts.2.up_proj"] is bnb.nn.Linear4bit
    assert kinds["lm_head"] is torch.nn.Linear and model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert moe.parameter_bytes(model) < full


# ---------------------------------------------------------------- through train_moe.main

@pytest.fixture(scope="module")
def dense_vlm(vlm_inputs, tmp_path_factory):  # noqa: F811
    """A tiny dense VLM (4 projector steps): what the moe stage upcycles."""
    out = tmp_path_factory.mktemp("peft") / "projector"
    run_stage(args_for(vlm_inputs, out, "projector", vlm_inputs / "llm", classify_eval=0))
    return out / "final"


def normalised(name: str) -> str:
    """A training-checkpoint name as the plain model's (PEFT wrapper segments removed)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def unfused_start(run_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(run_dir / "start", dtype=torch.float32)
    moe.unfuse_experts(model)
    return model


@pytest.fixture(scope="module")
def lora_run(vlm_inputs, dense_vlm, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("peft") / "moe_lora"
    result = run_stage(args_for(vlm_inputs, out, "moe", dense_vlm, moe_lora_r=4, moe_lora_alpha=8,
                                moe_lora_dropout=0.1, learning_rate=1e-2, save_every=4))
    return out, result


def test_expert_lora_with_dropout_trains_routers_and_adapters_and_leaves_every_base_weight_bit_equal(lora_run):
    out, result = lora_run
    trained = load_file(out / "checkpoints/step_0000004/model.safetensors")
    start = unfused_start(out).state_dict()
    lora = {k for k in trained if "lora_" in k}
    assert lora and all(re.search(r"\.mlp\.experts\.\d\.(gate|up|down)_proj\.lora_[AB]\.", k) for k in lora)
    base = {normalised(k): v for k, v in trained.items() if k not in lora}
    assert set(start) - set(base) == {"lm_head.weight"}  # tied to the embeddings: saved once
    routers = {k for k in base if k.endswith("mlp.gate.weight")}
    changed = {k for k in base if not torch.equal(base[k], start[k])}
    assert len(routers) == 2 and changed == routers  # routers learn; base experts, attention, tower: bit-equal
    assert any(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in lora if "lora_B" in k)
    adapter = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter["lora_dropout"] == 0.1 and adapter["r"] == 4
    assert sorted(adapter["modules_to_save"]) == sorted(k.removesuffix(".weight") for k in routers)


def test_expert_lora_dropout_reaches_every_expert_lora_layer(vlm_inputs, dense_vlm, tmp_path):  # noqa: F811
    from semivlm import vlm
    from semivlm.loop import make_accelerator

    cfg = load_config(train_moe.MoEConfig, args_for(vlm_inputs, tmp_path, "moe", dense_vlm, moe_lora_r=4,
                                                     moe_lora_dropout=0.25))
    reset_accelerate()
    accelerator = make_accelerator(cfg)
    dense, _ = vlm.load_vlm(dense_vlm)
    model = moe.upcycle(dense, 4, 2)
    model, _, _, _ = train_moe.prepare_stage_model(cfg, model, accelerator)
    drops = {n: m for n, m in model.named_modules() if n.endswith("lora_dropout.default")}
    assert len(drops) == 2 * 4 * 3  # 2 layers × 4 experts × gate/up/down
    assert all(isinstance(m, torch.nn.Dropout) and m.p == 0.25 for m in drops.values())


def test_expert_lora_export_is_plain_mixtral_whose_logits_equal_the_peft_models_forward(lora_run, vlm_inputs):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out, _ = lora_run
    final = AutoModelForImageTextToText.from_pretrained(out / "final", dtype=torch.float32).eval()
    assert final.config.text_config.model_type == "mixtral"
    assert {n for n, _ in final.named_parameters() if ".experts." in n} == {
        f"model.language_model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    peft_model = PeftModel.from_pretrained(unfused_start(out), out / "adapter").eval()  # base + LoRA, unmerged
    ids = torch.randint(0, final.config.text_config.vocab_size - 1, (2, 20))
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, final(input_ids=ids).logits
    # merged W + s·B·A against x·W + s·(x·A)·B: the same sums of H (+ r) terms per projection, rounded apart, through
    # 2 layers of 7 projections
    tol = fp32_sum_tol(2 * 7 * (64 + 128 + 4), float(want.abs().max()))
    assert (got - want).abs().max() <= tol


def test_nf4_moe_stage_trains_adapters_and_exports_merged_onto_the_unquantised_start(vlm_inputs, dense_vlm,  # noqa: F811
                                                                                     tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "moe_qlora"
    result = run_stage(args_for(vlm_inputs, out, "moe", dense_vlm, quantization="nf4", moe_lora_r=4, moe_lora_alpha=8,
                                moe_lora_dropout=0.05, learning_rate=1e-2))
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    config = json.loads((out / "final/config.json").read_text())
    assert "quantization_config" not in config and config["text_config"]["model_type"] == "mixtral"
    final = AutoModelForImageTextToText.from_pretrained(out / "final", dtype=torch.float32).state_dict()
    start = AutoModelForImageTextToText.from_pretrained(out / "start", dtype=torch.float32).state_dict()
    # attention, embeddings, norms, tower, projector: the unquantised start's weights, not their 4-bit round trip
    frozen = [k for k in final if ".mlp." not in k]
    assert frozen and all(torch.equal(final[k], start[k]) for k in frozen)
    experts = [k for k in final if ".experts." in k]
    assert all(not torch.equal(final[k], start[k]) for k in experts)  # the LoRA merged into every expert
    # and the export is exactly start + the saved adapter (expert LoRA, routers), merged and fused back
    merged = PeftModel.from_pretrained(unfused_start(out), out / "adapter").merge_and_unload()
    moe.fuse_experts(merged)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=0)


def test_nf4_moe_stage_stopped_and_resumed_trains_the_same_losses_and_export_as_an_uninterrupted_run(
        vlm_inputs, dense_vlm, tmp_path, capsys):  # noqa: F811
    """A QLoRA run requeued midway: the checkpoint holds nf4 layers (packed weights, quant state) and LoRA with
    dropout; the resumed run must replay the uninterrupted run's steps 3-4 and export the same model."""
    from safetensors.torch import load_file

    qlora = dict(quantization="nf4", moe_lora_r=4, moe_lora_alpha=8, moe_lora_dropout=0.05, learning_rate=1e-2,
                 classify_eval=0)
    straight = run_stage(args_for(vlm_inputs, tmp_path / "a", "moe", dense_vlm, **qlora))
    stopped = run_stage(args_for(vlm_inputs, tmp_path / "b", "moe", dense_vlm, exit_after_steps=2, **qlora))
    assert stopped["stopped_early"] and stopped["final_dir"] is None
    capsys.readouterr()
    resumed = run_stage(args_for(vlm_inputs, tmp_path / "b", "moe", dense_vlm, **qlora))
    assert re.search(r"resumed from \S+step_0+2 at step 2", capsys.readouterr().out)
    a = {h["step"]: h["loss"] for h in straight["history"] if "loss" in h}
    b = {h["step"]: h["loss"] for h in resumed["history"] if "loss" in h}
    assert sorted(b) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history, 3-4 trained after the resume
    # same seed (adapter init, dropout masks), data order and kernels in one process: equal up to summation order only,
    # bounded by one fp32 rounding of the loss per accumulated token (max_length 192 × micro-batch 4). Step 2 is the
    # stopped run's own: before train_moe seeded torch, two runs of one config drew different adapters and differed here
    for step in (1, 2, 3, 4):
        assert b[step] == pytest.approx(a[step], rel=fp32_sum_tol(192 * 4, 1.0)), step
    want, got = load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_nf4_llm_stage_trains_lora_and_the_projector_and_exports_onto_the_unquantised_base(vlm_inputs,  # noqa: F811
                                                                                          dense_vlm, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "llm_qlora"
    run_stage(args_for(vlm_inputs, out, "llm", dense_vlm, quantization="nf4", lora_r=4, lora_alpha=8))
    final = AutoModelForImageTextToText.from_pretrained(out / "final", dtype=torch.float32).state_dict()
    start = AutoModelForImageTextToText.from_pretrained(dense_vlm, dtype=torch.float32).state_dict()
    changed = {k for k in final if not torch.equal(final[k], start[k])}
    projections = {k for k in final if "language_model" in k and re.search(r"\.(q|k|v|o|gate|up|down)_proj\.", k)}
    projector = {k for k in final if "multi_modal_projector" in k}
    assert changed == projections | projector  # tower, embeddings, norms: the unquantised base's, bit-equal


# ---------------------------------------------------------------- settings that cannot run: one line each

def test_nf4_under_zero3_is_refused_with_one_line(vlm_inputs, dense_vlm, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(train_moe, "zero_stage", lambda accelerator: 3)
    with pytest.raises(SystemExit, match=r"^quantization: nf4 is not supported under ZeRO-3; use ds_configs/zero2"):
        run_stage(args_for(vlm_inputs, tmp_path, "moe", dense_vlm, quantization="nf4", moe_lora_r=4))
    with pytest.raises(SystemExit, match=r"^moe_lora_dropout > 0 is not supported under ZeRO-3"):
        run_stage(args_for(vlm_inputs, tmp_path, "moe", dense_vlm, moe_lora_dropout=0.1, moe_lora_r=4))
    assert not (tmp_path / "start").exists()  # refused before upcycling


def test_nf4_without_bitsandbytes_is_one_line(vlm_inputs, dense_vlm, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(SystemExit, match=r"^quantization: nf4 needs bitsandbytes \(pip install bitsandbytes"):
        run_stage(args_for(vlm_inputs, tmp_path, "moe", dense_vlm, quantization="nf4", moe_lora_r=4))


def test_nf4_on_a_device_bitsandbytes_cannot_serve_is_one_line(vlm_inputs, dense_vlm, tmp_path, monkeypatch):  # noqa: F811
    import bitsandbytes as bnb

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", unsupported)
    with pytest.raises(SystemExit, match=r"^quantization: nf4: bitsandbytes [\d.]+ cannot quantise or run 4-bit layers"
                                         r" on device 'cpu' \(NotImplementedError: no 4-bit kernel"):
        run_stage(args_for(vlm_inputs, tmp_path, "moe", dense_vlm, quantization="nf4", moe_lora_r=4))


@pytest.mark.parametrize("overrides, message", [
    ({"stage": "projector", "quantization": "nf4"},
     r"--stage projector does not read quantization \(read by the llm and moe stages\)"),
    ({"stage": "llm", "moe_lora_dropout": 0.1}, r"--stage llm does not read moe_lora_dropout \(read by the moe stage\)"),
    ({"quantization": "nf4"}, r"^quantization: nf4 \(QLoRA\) trains LoRA on a frozen 4-bit base: set moe_lora_r > 0"),
    ({"stage": "llm", "quantization": "nf4"}, r"^quantization: nf4 \(QLoRA\) .*: set lora_r > 0"),
    ({"moe_lora_dropout": 0.1}, r"^moe_lora_dropout needs expert LoRA: set moe_lora_r > 0"),
])
def test_lora_and_quantization_settings_that_cannot_run_are_one_line(vlm_inputs, dense_vlm, tmp_path,  # noqa: F811
                                                                     overrides, message):
    stage = overrides.pop("stage", "moe")
    with pytest.raises(SystemExit, match=message):
        run_stage(args_for(vlm_inputs, tmp_path, stage, dense_vlm, **overrides))


def test_an_nf4_models_state_dict_loads_back_strictly_after_a_forward():
    """What a QLoRA checkpoint and its resume go through (accelerate save_state / safetensors strict load_model):
    before the fix, the shared nf4 code tensor and the CPU repacking at the first forward broke the load."""
    from peft import get_peft_model
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM

    def build():
        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        model = moe.upcycle(AutoModelForCausalLM.from_config(config), 4, 2, seed=0)
        moe.unfuse_experts(model)
        moe.quantize_nf4(model, "cpu")
        return get_peft_model(model, moe.unfused_expert_lora_config(4, 8, 0.0)).eval()

    trained, ids = build(), torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_()
        want = trained(ids).logits
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_model(trained, f"{d}/model.safetensors")
        resumed = build()
        load_model(resumed, f"{d}/model.safetensors", strict=True)
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, want)


def test_an_nf4_layer_of_the_debug_ffn_width_answers_under_no_grad_as_in_training():
    # 352 = the debug recipe's intermediate size, not a multiple of 64: bitsandbytes' CPU inference repacking broke
    # the first held-out evaluation of an nf4 run
    layer = moe.nf4_linear(torch.nn.Linear(352, 128), "cpu")
    x = torch.randn(3, 352)
    layer.train()
    trained = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), trained)
