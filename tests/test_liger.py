"""Liger kernels through liger-kernel 0.8.5's real Python wiring (its patch functions, model-type table and Liger
module classes) on tiny models. Triton needs CUDA, so the `triton` package is replaced by a stub while these
tests run: the patches only bind Liger's forwards, which are never called here."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from unittest import mock

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


class _TritonStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import triton...` gives a MagicMock module: enough for Liger's @triton.jit kernels to be defined."""

    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__, module.__name__, module.__version__ = [], spec, spec.name, "3.5.0"
        return module

    def exec_module(self, module):
        pass


@pytest.fixture
def liger(monkeypatch):
    """liger_kernel.transformers.monkey_patch as installed, with a CUDA GPU pretended; afterwards transformers'
    modelling modules and torch's cross_entropy are put back whatever the code under test did."""
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel not installed (make setup installs its Python wiring: pip install --no-deps "
                    "liger-kernel==0.8.5)")
    import transformers.models.clip.modeling_clip  # noqa: F401  (imported before the snapshot)
    import transformers.models.llava.modeling_llava  # noqa: F401
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401
    import peft  # noqa: F401  (Liger imports it; bitsandbytes must see the real CPU-only torch when it loads)
    import bitsandbytes  # noqa: F401

    hf = {n: m for n, m in list(sys.modules.items()) if n.startswith("transformers.models.") and m is not None}
    saved = {n: dict(vars(m)) for n, m in hf.items()}
    cross_entropy = torch.nn.functional.cross_entropy
    loaded = set(sys.modules)
    stub = _TritonStub()
    sys.meta_path.insert(0, stub)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        from liger_kernel.transformers import monkey_patch

        yield monkey_patch
    finally:
        sys.meta_path.remove(stub)
        torch.nn.functional.cross_entropy = cross_entropy
        for n, m in hf.items():
            vars(m).clear()
            vars(m).update(saved[n])
        for n in set(sys.modules) - loaded:
            if n.split(".")[0] in ("triton", "liger_kernel"):
                del sys.modules[n]


def llava(text_config):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=63, image_seq_length=4)
    return LlavaForConditionalGeneration(config).eval()


def qwen3_moe_vlm(moe_every: int):
    from transformers import Qwen3Config

    from semivlm import moe

    return llava(moe.moe_text_config(Qwen3Config(**SHAPE), num_experts=4, top_k=2, moe_every=moe_every))


def mixtral_vlm():
    from transformers import LlamaConfig

    from semivlm import moe

    return llava(moe.moe_text_config(LlamaConfig(**SHAPE), num_experts=4, top_k=2))


def liger_parts(model) -> list[str]:
    """Names of the modules that run a Liger forward (bound on the instance or by class)."""
    return [name for name, m in model.named_modules()
            if type(m).__module__.startswith("liger_kernel")
            or getattr(getattr(m.__dict__.get("forward"), "__func__", None), "__module__", "").startswith("liger_kernel")]


@pytest.mark.parametrize("moe_every", [1, 2])
def test_liger_on_a_qwen3_moe_vlm_keeps_the_experts_and_patches_its_dense_layers(liger, moe_every):
    """swiglu=False must reach the text model's patch through the Llava one: with moe_every 2 the dense layers are
    Qwen3MoeMLP (no `experts`), where Liger's swiglu=True path raises AttributeError."""
    from semivlm.model import apply_liger

    model = qwen3_moe_vlm(moe_every)
    message = apply_liger(model, "on", 2)
    assert "experts keep their experts_implementation" in message
    layers = model.model.language_model.layers
    for layer in layers:
        if hasattr(layer.mlp, "experts"):  # grouped_mm / eager experts: the HF class's own forward
            assert "forward" not in vars(layer.mlp.experts), type(layer.mlp.experts)
        else:
            assert layer.mlp.forward.__func__ is liger.LigerSwiGLUMLP.forward
        assert layer.input_layernorm.forward.__func__ is liger.LigerRMSNorm.forward
    dense = sum(not hasattr(layer.mlp, "experts") for layer in layers)
    assert dense == (1 if moe_every == 2 else 0) and f"SwiGLU on {dense} dense MLPs" in message
    assert model.forward.__func__.__module__ == "liger_kernel.transformers.model.llava"  # fused linear CE


def test_liger_on_a_mixtral_vlm_leaves_the_experts_to_their_experts_implementation(liger):
    from semivlm.model import apply_liger

    model = mixtral_vlm()
    assert "experts keep" in apply_liger(model, "on", 0)
    for layer in model.model.language_model.layers:
        assert "forward" not in vars(layer.mlp.experts)  # not LigerExperts' per-expert loop
        assert layer.post_attention_layernorm.forward.__func__ is liger.LigerRMSNorm.forward


def test_liger_on_a_dense_causal_lm_gets_swiglu(liger):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from semivlm.model import apply_liger

    model = Qwen3ForCausalLM(Qwen3Config(**SHAPE))
    assert apply_liger(model, "auto", 0) == "on"
    assert all(layer.mlp.forward.__func__ is liger.LigerSwiGLUMLP.forward for layer in model.model.layers)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_liger_patches_only_its_instance_so_a_model_loaded_afterwards_is_plain(liger, zero_stage):
    """The classification check reloads the trained model in the same process, on CPU: it must not be built from
    Liger's Triton-only classes nor call Liger's RoPE or cross-entropy."""
    from transformers import Qwen3Config
    from transformers.models.qwen3 import modeling_qwen3

    from semivlm.model import apply_liger

    rope, cross_entropy = modeling_qwen3.apply_rotary_pos_emb, torch.nn.functional.cross_entropy
    trained = llava(Qwen3Config(**SHAPE))  # the llm stage's model
    apply_liger(trained, "on", zero_stage)
    assert liger_parts(trained)
    # this instance keeps Liger's RoPE: its attention forwards see Liger's function
    attention = trained.model.language_model.layers[0].self_attn
    assert attention.forward.__func__.__globals__["apply_rotary_pos_emb"] is liger.liger_rotary_pos_emb
    # ... and nothing else does
    assert modeling_qwen3.apply_rotary_pos_emb is rope
    assert modeling_qwen3.Qwen3RMSNorm.__module__ == modeling_qwen3.__name__
    assert torch.nn.functional.cross_entropy is cross_entropy
    reloaded = llava(Qwen3Config(**SHAPE))
    assert liger_parts(reloaded) == []
    ids = torch.randint(0, 60, (1, 8))
    out = reloaded(input_ids=ids, labels=ids)  # runs on CPU: no Triton anywhere in its path
    assert torch.isfinite(out.loss)
    if zero_stage == 3:  # Liger's plain cross-entropy is this model's loss only, swapped in for the call
        cells = [c.cell_contents for c in trained.loss_function.__closure__]
        assert liger.liger_cross_entropy in cells
