"""Stage III sparse upcycling on tiny CPU models: exact copies, faithful configs, HF-native export, routing
telemetry and auxiliary losses."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import fp32_sum_tol

from semivlm import moe

VOCAB, IMAGE_ID = 96, 95
# Non-default values everywhere they could be lost: head_dim != hidden/heads, rope_theta, eps, ids, windows
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-3, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
DENSE = {
    "llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=True),
    "mistral": dict(rope_parameters={"rope_type": "default", "rope_theta": 2000.0}, sliding_window=4,
                    hidden_act="gelu"),
    "qwen3": dict(rope_parameters={"rope_type": "default", "rope_theta": 300.0}, attention_bias=True,
                  use_sliding_window=True, max_window_layers=0, sliding_window=4, tie_word_embeddings=True),
    # layer 0 full attention, layer 1 a 4-token window; head_dim is not a declared Qwen2 field but is read
    "qwen2": dict(rope_parameters={"rope_type": "default", "rope_theta": 300.0}, use_sliding_window=True,
                  max_window_layers=1, sliding_window=4),
}
MOE_CLASS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM",
             "qwen2": "Qwen2MoeForCausalLM"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomised(model):
    """Weights of std 0.3 (norms included), so a lost rope_theta/eps/norm shows up in the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def dense_lm(family, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**COMMON, **DENSE[family], **overrides})
    return randomised(AutoModelForCausalLM.from_config(config))


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4)
    text = LlamaConfig(**COMMON, **DENSE["llama"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, image_seq_length=16,
                         vision_feature_select_strategy="default")
    return randomised(LlavaForConditionalGeneration(config))


def llava_inputs(batch=2):
    # transformers 5 Llava wants the <image> id already repeated once per image feature (16 patches, CLS dropped)
    row = [1, 5, 6] + [IMAGE_ID] * 16 + [7, 8, 9]
    torch.manual_seed(1)
    return torch.tensor([row] * batch), torch.randn(batch, 3, 32, 32)


def tiny_mixtral(layers=2, hidden=32):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = randomised(MixtralForCausalLM(config))
    moe.set_experts_implementation(model, "cpu")
    return model


@pytest.mark.parametrize("family,moe_every", [("llama", 1), ("mistral", 1), ("qwen3", 1), ("qwen3", 2),
                                              ("qwen2", 1), ("qwen2", 2)])
def test_upcycling_reproduces_the_dense_logits(family, moe_every):
    dense = dense_lm(family)
    model = moe.upcycle(dense, num_experts=4, top_k=2, moe_every=moe_every).eval()
    assert moe.set_experts_implementation(model, "cpu") == "eager"
    assert type(model).__name__ == MOE_CLASS[family]
    assert moe.uncarried_fields(dense.config, model.config) == []
    assert moe.moe_layer_indices(model.config) == ([0, 1] if moe_every == 1 else [0])  # MoE-LLaVA: 0, 2, 4, ...
    assert model.config.num_experts_per_tok == 2 and getattr(model.config, "norm_topk_prob", True)
    if dense.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))  # 12 > window of 4
    with torch.no_grad():
        want = dense(ids).logits
        diff = (want - model(ids).logits).abs().max().item()
    # exact in real arithmetic; in fp32 the experts run as other GEMMs (per-expert token subsets, their own kernel)
    # and the top-2 weights sum to 1 only to rounding, so each layer's MLP dot products (H + I terms) and the lm_head's
    # (H) may round differently: ~1e-5 of the logits' scale, far below a wrong copy's error (>1e-3, next test)
    c = dense.config
    tol = fp32_sum_tol(c.num_hidden_layers * (c.hidden_size + c.intermediate_size) + c.hidden_size,
                       want.abs().max().item())
    assert diff <= tol, f"{family}: upcycled logits differ by {diff} > {tol}"
    experts = model.model.layers[0].mlp.experts
    mlp = dense.model.layers[0].mlp
    assert torch.equal(experts.gate_up_proj[3], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(experts.down_proj[3], mlp.down_proj.weight)


def test_default_mixtral_rope_theta_would_break_the_copy():
    """The checks above have teeth: MixtralConfig's own rope_theta (1e6, Llama's is 1e4) is caught by
    uncarried_fields and moves the logits far beyond the 1e-5 tolerance."""
    from transformers import MixtralConfig, MixtralForCausalLM

    dense = dense_lm("llama")
    model = moe.upcycle(dense).eval()
    bookkeeping = {"rope_parameters", "model_type", "transformers_version", "architectures", "_name_or_path"}
    wrong_config = MixtralConfig(**{k: v for k, v in model.config.to_dict().items() if k not in bookkeeping})
    assert wrong_config.rope_parameters["rope_theta"] == 1e6
    assert moe.uncarried_fields(dense.config, wrong_config) == ["rope_parameters"]
    wrong = MixtralForCausalLM(wrong_config).eval()
    wrong.load_state_dict(model.state_dict())
    moe.set_experts_implementation(wrong, "cpu")
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (dense(ids).logits - wrong(ids).logits).abs().max() > 1e-3


def test_upcycling_keeps_dtypes_and_copies_experts_bit_for_bit():
    mixed = tiny_llava()  # an fp32 vision tower and projector beside a bf16 language model
    mixed.model.language_model.to(torch.bfloat16)
    upcycled = moe.upcycle(mixed)
    assert {n.split(".")[1]: p.dtype for n, p in upcycled.named_parameters()} == {
        "vision_tower": torch.float32, "multi_modal_projector": torch.float32, "language_model": torch.bfloat16}

    dense = dense_lm("llama").to(torch.bfloat16)
    model = moe.upcycle(dense).eval()
    moe.set_experts_implementation(model, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    mlp = dense.model.layers[1].mlp
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj[0], mlp.down_proj.weight)
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # top-k weights are fp32, the two expert halves are rounded to bf16 before the sum
        assert (dense(ids).logits.float() - model(ids).logits.float()).abs().max() <= 0.05


@pytest.mark.parametrize("family,overrides,kwargs,field", [
    ("llama", {"mlp_bias": True}, {}, "mlp_bias"),
    ("llama", {"attention_bias": True}, {}, "attention_bias"),
    ("llama", {}, {"moe_every": 2}, "moe_every"),
    ("qwen3", {"max_window_layers": 1}, {}, "sliding"),  # layer 0 full, layer 1 windowed: Qwen3Moe has one window
    ("llama", {}, {"top_k": 5}, "top_k"),
])
def test_upcycling_refuses_what_cannot_be_exact(family, overrides, kwargs, field):
    with pytest.raises(ValueError, match=field):
        moe.upcycle(dense_lm(family, **overrides), **kwargs)


def test_upcycling_refuses_unsupported_models():
    from transformers import GPT2Config, LlamaConfig, LlamaModel

    with pytest.raises(ValueError, match="gpt2"):
        moe.moe_text_config(GPT2Config())
    with pytest.raises(ValueError, match="ForCausalLM"):
        moe.upcycle(LlamaModel(LlamaConfig(**COMMON)))


def test_upcycled_llava_is_exact_and_reloads_as_plain_hf(tmp_path):
    from transformers import AutoModelForImageTextToText

    dense = tiny_llava()
    model = moe.upcycle(dense).eval()
    moe.set_experts_implementation(model, "cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.model_type == "mixtral"
    assert moe.uncarried_fields(dense.config.text_config, model.config.text_config) == []
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tie_word_embeddings kept
    for name in ("vision_tower", "multi_modal_projector"):
        for (k, a), (_, b) in zip(getattr(dense.model, name).state_dict().items(),
                                  getattr(model.model, name).state_dict().items()):
            assert torch.equal(a, b), k
    ids, pixels = llava_inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        want = dense(input_ids=ids, pixel_values=pixels).logits
        c = dense.config.text_config  # bound derived as in test_upcycling_reproduces_the_dense_logits
        tol = fp32_sum_tol(c.num_hidden_layers * (c.hidden_size + c.intermediate_size) + c.hidden_size,
                           want.abs().max().item())
        assert (want - logits).abs().max() <= tol
        # Llava drops the language model's router logits: that is why RouterProbe hooks the routers itself
        out = model(input_ids=ids, pixel_values=pixels, output_router_logits=True)
        assert getattr(out, "router_logits", None) is None and getattr(out, "aux_loss", None) is None

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(reloaded).__name__ == "LlavaForConditionalGeneration"
    # transformers' own API raises on the Llava wrapper for grouped_mm; ours sets it on the MoE language model
    assert moe.set_experts_implementation(reloaded, "cuda") == "grouped_mm"
    assert reloaded.config.text_config._experts_implementation == "grouped_mm"
    with torch.no_grad():
        assert (reloaded(input_ids=ids, pixel_values=pixels).logits - logits).abs().max() <= 1e-5
    moe.set_experts_implementation(reloaded, "cpu")
    generated = reloaded.generate(input_ids=ids[:1], pixel_values=pixels[:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch, on the width-0 shared expert
def test_qwen2moe_shared_expert_is_empty_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = moe.upcycle(dense_lm("qwen2")).eval()
    assert model.config.shared_expert_intermediate_size == 0
    assert model.model.layers[0].mlp.shared_expert.down_proj.weight.numel() == 0
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_router_probe_losses_match_transformers_and_are_differentiable():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = tiny_mixtral()
    probe = moe.RouterProbe(model)
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding must not count
    probe.start(mask)
    out = model(ids, attention_mask=mask, output_router_logits=True)
    aux, z = probe.losses()
    # per layer, exactly transformers' formula (which pools layers; the probe averages them instead)
    expected = torch.stack([load_balancing_loss_func((logits,), 4, 2, mask) for logits in out.router_logits])
    assert torch.allclose(aux, expected.mean(), atol=1e-6)
    lse = torch.stack([torch.logsumexp(logits, -1) ** 2 for logits in out.router_logits])  # (layers, tokens)
    assert torch.allclose(z, (lse * mask.reshape(-1)).sum(1).div(mask.sum()).mean(), atol=1e-5)
    (aux + z).backward()
    assert all(model.model.layers[i].mlp.gate.weight.grad.abs().sum() > 0 for i in range(2))
    # one layer: equal to the model's own aux_loss (computed with output_router_logits=True)
    one = tiny_mixtral(layers=1)
    probe = moe.RouterProbe(one)
    probe.start(mask)
    out = one(ids, attention_mask=mask, output_router_logits=True)
    assert torch.allclose(probe.losses()[0], out.aux_loss, atol=1e-6)


def test_router_probe_splits_image_and_text_tokens_and_skips_padding():
    """Handcrafted: with attention silenced, the router sees each token's embedding; the image token points
    along +e0 and routes to experts {0, 1}, text tokens along -e0 route to {2, 3}."""
    model = tiny_mixtral(layers=1)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.post_attention_layernorm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.1)
        emb[:, 0] = -10.0
        emb[IMAGE_ID, 0] = 10.0
        layer.mlp.gate.weight.zero_()
        layer.mlp.gate.weight[:, 0] = torch.tensor([5.0, 4.0, -4.0, -5.0])
    probe = moe.RouterProbe(model)
    ids = torch.tensor([[IMAGE_ID] * 6 + [3, 4, 5, 6], [IMAGE_ID] * 6 + [7, 8, IMAGE_ID, IMAGE_ID]])
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding that looks like image tokens
    for _ in range(2):
        probe.start(mask, ids == IMAGE_ID)
        with torch.no_grad():
            model(ids, attention_mask=mask)
    summary = json.loads(json.dumps(probe.summary()))
    layer0 = summary["layers"][0]
    assert layer0["image"] == [0.5, 0.5, 0.0, 0.0]
    assert layer0["text"] == [0.0, 0.0, 0.5, 0.5]
    assert layer0["tokens"] == {"image": 24, "text": 12, "all": 36}  # two forwards, padding excluded
    assert layer0["all"] == pytest.approx([1 / 3, 1 / 3, 1 / 6, 1 / 6], abs=1e-5)
    assert summary["num_experts"] == 4 and summary["top_k"] == 2 and summary["aux_loss_mean"] > 0
    probe.reset()
    assert probe.summary()["layers"] == []
    with pytest.raises(ValueError, match="attention_mask"):
        probe.start(mask[:, :5])
        model(ids)


def test_router_probe_counts_once_under_activation_checkpointing():
    model = tiny_mixtral()
    model.gradient_checkpointing_enable()  # transformers 5 default: non-reentrant
    model.train()
    calls = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda *args: calls.append(1))
    probe = moe.RouterProbe(model)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    probe.start()
    out = model(ids, labels=ids)
    aux, z = probe.losses()
    (out.loss + 0.1 * aux + 0.01 * z).backward()
    assert len(calls) == 2  # the forward and its recompute during backward
    assert probe.summary()["layers"][0]["tokens"]["all"] == 16  # counted once
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_aux_loss_pushes_routing_toward_balance():
    """Routers alone trained on the LM loss, with and without the aux loss, from the same skewed start."""

    def train(aux_coef):
        model = tiny_mixtral(layers=1)
        with torch.no_grad():
            model.model.layers[0].mlp.gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith("mlp.gate.weight")  # routers only
        probe = moe.RouterProbe(model)
        ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        model.train()
        for _ in range(25):
            probe.start()
            out = model(ids, labels=ids)
            aux, _ = probe.losses()
            (out.loss + aux_coef * aux).backward()
            opt.step()
            opt.zero_grad()
        probe.reset()
        probe.start()
        with torch.no_grad():
            model(ids)
        shares = probe.summary()["layers"][0]["all"]
        return max(shares) - min(shares)

    balanced, free = train(1.0), train(0.0)
    assert balanced < free and balanced < 0.1, (balanced, free)


def test_zero3_leaf_registration_names_the_sparse_block_classes():
    from deepspeed.utils.z3_leaf_module import z3_leaf_module

    model = moe.upcycle(dense_lm("qwen3"), moe_every=2)
    assert moe.register_zero3_leaf_modules(model) == ["Qwen3MoeSparseMoeBlock"]
    assert z3_leaf_module(model.model.layers[0].mlp) and not z3_leaf_module(model.model.layers[1].mlp)
    assert moe.register_zero3_leaf_modules(tiny_mixtral()) == ["MixtralSparseMoeBlock"]
    with pytest.raises(ValueError, match="no sparse MoE blocks"):
        moe.register_zero3_leaf_modules(dense_lm("llama"))


def test_expert_and_router_names_and_expert_lora_training():
    from peft import get_peft_model

    model = moe.upcycle(dense_lm("llama"))
    names = moe.expert_and_router_parameter_names(model)
    assert set(names) == {f"model.layers.{i}.mlp.{p}" for i in range(2)
                          for p in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
    assert set(names) <= dict(model.named_parameters()).keys()

    config = moe.expert_lora_config(model, r=4, alpha=8)
    assert sorted(config.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    peft_model = get_peft_model(model, config)
    moe.set_experts_implementation(peft_model, "cpu")
    probe = moe.RouterProbe(peft_model)  # routers are found through the PEFT wrapper
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    probe.start()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == set(lora)  # base experts, routers and the rest stay frozen
    assert len(probe.summary()["layers"]) == 2
