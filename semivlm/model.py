"""Model and tokenizer construction: `from_pretrained` of a directory or hub id, or a tiny config for debug runs.

Everything here returns plain Hugging Face objects; nothing needs custom modelling code or trust_remote_code.
"""
from __future__ import annotations

import contextlib
import json
import re
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch


def load_tokenizer(name_or_path: str):
    """AutoTokenizer from a local directory or hub id; a clear error naming the path when it cannot be found."""
    from transformers import AutoTokenizer

    if not name_or_path:
        raise SystemExit("no tokenizer given: set `tokenizer` (a directory or hub id) or `init_from`")
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise SystemExit(f"tokenizer directory '{name_or_path}' does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot load tokenizer '{name_or_path}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:  # Llama-3-style tokenizers ship without one; padding is masked out of the loss anyway
        tok.pad_token = tok.eos_token
    return tok


def build_causal_lm(init_from: str, model_config: dict, vocab_size: int, dtype: torch.dtype,
                    attn_implementation: str = "sdpa"):
    """A decoder LM: `from_pretrained(init_from)` when given, else random init from the `model_config` mapping.

    Under an active ZeRO-3 config (accelerate sets it up before this is called) both paths construct the model
    already partitioned across ranks, so no rank ever holds the full weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if init_from:
        if init_from.startswith((".", "/", "~")) and not Path(init_from).expanduser().is_dir():
            raise SystemExit(f"init_from directory '{init_from}' does not exist")
        try:
            model = AutoModelForCausalLM.from_pretrained(init_from, dtype=dtype, attn_implementation=attn_implementation)
        except (OSError, ValueError) as e:
            raise SystemExit(f"cannot load model '{init_from}': {str(e).splitlines()[0]}") from None
        # num_embeddings, not weight.shape: under ZeRO-3 the local weight is an empty placeholder
        if vocab_size and model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    if not model_config:
        raise SystemExit("set either `init_from` (a model directory or hub id) or `model_config` (a tiny random model)")
    spec = dict(model_config)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise SystemExit("model_config needs a `model_type` (e.g. llama, qwen2, qwen3, mistral)")
    spec.setdefault("vocab_size", vocab_size)
    config = AutoConfig.for_model(model_type, **spec)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap `model` with PEFT LoRA on the named projections; returns (peft_model, lora_config)."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                             task_type="CAUSAL_LM")
    return get_peft_model(model, lora_config), lora_config


# ---------------------------------------------------------------- dynamic rank (DyLoRA; sLAVA's DyA)

class DynamicRank:
    """Nested dynamic rank for every PEFT LoRA layer of `model`, as DyLoRA (Valipour et al., EACL 2023) and sLAVA's
    DyA train it: at each optimizer step only the leading r' components of every adapter take part in the forward
    (the first r' rows of lora_A, the first r' columns of lora_B), so they alone get gradients, and one adapter
    serves every rank in [rank_min, r] once truncated (`truncate_adapter`).

    r' is drawn uniformly from [rank_min, r] as a function of (seed, step) only (`set_step`, called by the training
    loop's `before_step`): every micro-batch of a step and every process use the same r', and a resumed run draws what
    the uninterrupted one drew. Outside training mode (held-out eval inside the loop) `eval_rank` is used: None (the
    default) = the full rank r, or a sub-rank to measure without truncating and merging (e.g. a benchmark at r/2).

    Scaling alpha/r', as DyLoRA (its forward is W0·x + (alpha/b)·B[:, :b]·A[:b]·x for sampled b): the sub-adapter
    trained at a step is then exactly the rank-r' adapter PEFT builds from the truncated weights with `r = r'` (PEFT
    scales by lora_alpha / r), so a truncated adapter is evaluated as the function it was trained as, with no alpha
    rewrite. (alpha/r would shrink a truncated adapter's update by r'/r relative to how a rank-r' LoRA is scaled.)

    Mechanism, without slicing any parameter (ZeRO-3 partitions them; slices would also break the checkpoint layout):
    - LoRA layers that call lora_A as a module (Linear, bitsandbytes Linear4bit/8bit): a forward hook multiplies
      lora_A's output (the rank axis, last) by a mask of r/r' on the first r' components and 0 beyond. Masking A's
      output is enough: the components beyond r' then contribute nothing, and both lora_A's rows and lora_B's
      columns beyond r' get zero gradient.
    - PEFT's ParamWrapper on fused 3-D expert tensors (target_parameters), which never calls lora_A but reads its
      weight in `get_delta_factors` (delta = scaling · lhs @ rhs, rank the inner axis) or `get_delta_weight`: this
      instance's two methods are wrapped to mask the rank axis of lhs the same way (PEFT has no hook there).
    As with DyLoRA's own code, AdamW still moves components beyond r' by their earlier momentum and weight decay at
    steps where they get no gradient.
    """

    def __init__(self, model, rank_min: int, seed: int):
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import ParamWrapper

        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        if not layers:
            raise SystemExit("lora_dynamic_rank: the model has no LoRA adapters (set the stage's LoRA rank > 0)")
        self.r = max(r for m in layers for r in m.r.values())
        r_small = min(r for m in layers for r in m.r.values())
        if not 1 <= rank_min <= r_small:
            raise SystemExit(f"lora_rank_min {rank_min} is outside [1, {r_small}] (the adapters' rank)")
        self.rank_min, self.seed = rank_min, seed
        self.rank: int | None = None  # training mode; None = full rank (before the first step, or never set)
        self.eval_rank: int | None = None  # outside training mode; None = full rank
        self.handles = []
        for layer in layers:
            if isinstance(layer, ParamWrapper):
                self._wrap_param_wrapper(layer)
                continue
            for adapter, lora_a in layer.lora_A.items():
                if not isinstance(lora_a, torch.nn.Linear):
                    raise SystemExit(f"lora_dynamic_rank: LoRA layer {type(layer).__name__} ({type(lora_a).__name__} "
                                     "lora_A) is not supported: only Linear-style LoRA and expert ParamWrapper are")
                self.handles.append(lora_a.register_forward_hook(partial(self._mask_output, r=layer.r[adapter])))

    def draw(self, step: int) -> int:
        """r' of optimizer step `step` (0-based): uniform over [rank_min, r], fixed by (seed, step)."""
        import numpy as np

        return int(np.random.default_rng((0x44794C, self.seed, step)).integers(self.rank_min, self.r + 1))

    def set_step(self, step: int) -> None:
        """The training loop's `before_step`: every forward of this step trains the leading `draw(step)` components."""
        self.rank = self.draw(step)

    def set_rank(self, rank: int | None) -> None:
        """Train (or run in training mode) at a fixed sub-rank, e.g. a benchmark at r/2; None = full rank."""
        if rank is not None:
            check_rank(rank, self.r, self.rank_min, "rank")
        self.rank = rank

    def set_eval_rank(self, rank: int | None) -> None:
        """Run at a sub-rank outside training mode (None = full rank), e.g. loop.evaluate at r/2."""
        if rank is not None:
            check_rank(rank, self.r, self.rank_min, "rank")
        self.eval_rank = rank

    def mask(self, r: int, like: torch.Tensor, training: bool) -> torch.Tensor | None:
        """(r,) weights of the rank axis for a layer of rank r: r/r' on the first r', 0 beyond; None = leave as is."""
        rank = self.rank if training else self.eval_rank
        if rank is None or rank >= r:
            return None
        keep = torch.arange(r, device=like.device) < rank
        return keep.to(like.dtype) * (r / rank)

    def _mask_output(self, module, args, output, r: int):
        mask = self.mask(r, output, module.training)
        return output if mask is None else output * mask

    def _wrap_param_wrapper(self, layer) -> None:
        if layer.num_experts <= 1:
            raise SystemExit(f"lora_dynamic_rank: LoRA on the 2-D parameter '{layer.parameter_name}' "
                             "(target_parameters) is not supported; target its module instead")
        factors, delta_weight = layer.get_delta_factors, layer.get_delta_weight

        def masked_factors(adapter_name):
            lhs, rhs, scaling = factors(adapter_name)
            mask = self.mask(layer.r[adapter_name], lhs, layer.training)
            return (lhs if mask is None else lhs * mask), rhs, scaling

        def masked_delta_weight(adapter_name, *args, **kwargs):
            if self.mask(layer.r[adapter_name], layer.lora_A[adapter_name].weight, layer.training) is None:
                return delta_weight(adapter_name, *args, **kwargs)
            lhs, rhs, scaling = masked_factors(adapter_name)  # (E, X, r) @ (E, r, Y): get_delta_weight's layout
            param = layer.get_param()
            delta = scaling * (lhs.float() @ rhs.float())
            return delta.to(param.device, param.dtype if param.dtype.is_floating_point and param.element_size() >= 2
                            else delta.dtype)

        layer.get_delta_factors, layer.get_delta_weight = masked_factors, masked_delta_weight


def enable_dynamic_rank(model, rank_min: int, seed: int) -> DynamicRank:
    """Nested dynamic rank on every LoRA adapter of `model` (see DynamicRank); kept on the model as
    `model.dynamic_rank` so that what prepared the model and what trains it can both reach it. Returns it."""
    model.dynamic_rank = DynamicRank(model, rank_min, seed)
    return model.dynamic_rank


def check_rank(rank: int, r: int, rank_min: int = 1, what: str = "rank") -> None:
    """A rank to truncate to or train at must be one the adapter was trained at: in [rank_min, r]."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not rank_min <= rank <= r:
        raise SystemExit(f"{what} {rank!r} is outside [{rank_min}, {r}], the ranks this adapter was trained at")


def adapter_ranks(adapter_dir: str | Path) -> tuple[int, int]:
    """(rank_min, r) a PEFT adapter directory serves: r from adapter_config.json; rank_min from the run's
    run_config.json beside it (a train_*.py output_dir/adapter) when that run trained with lora_dynamic_rank, else 1
    (a fixed-rank adapter can be truncated too, only not as well)."""
    d = Path(adapter_dir)
    config = _adapter_config(d)
    run_config = d.parent / "run_config.json"
    run = json.loads(run_config.read_text()) if run_config.is_file() else {}
    return (int(run.get("lora_rank_min", 1)) if run.get("lora_dynamic_rank") else 1), int(config["r"])


def _adapter_config(d: Path) -> dict:
    path = d / "adapter_config.json"
    if not path.is_file():
        raise SystemExit(f"'{d}' is not a LoRA adapter directory (no adapter_config.json)")
    config = json.loads(path.read_text())
    if config.get("rank_pattern"):
        raise SystemExit(f"{path}: adapters with a rank_pattern (per-layer ranks) cannot be truncated to one rank")
    return config


def truncate_adapter(adapter_dir: str | Path, rank: int, out_dir: str | Path) -> Path:
    """Write `adapter_dir` cut to its leading `rank` components into `out_dir`: the first `rank` rows of every lora_A
    and columns of every lora_B, and `r: rank` in adapter_config.json, so PEFT scales it by lora_alpha / rank (the
    scaling dynamic-rank training used at that rank). Fused-expert adapters (ParamWrapper) hold E experts' ranks in
    one matrix, lora_A rows expert-major (E, r) and lora_B columns rank-major (r, E), as PEFT lays them out."""
    from safetensors.torch import load_file, save_file

    d, out = Path(adapter_dir), Path(out_dir)
    config = _adapter_config(d)
    rank_min, _ = adapter_ranks(d)
    check_rank(rank, int(config["r"]), rank_min)
    r = int(config["r"])
    weights_file = d / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise SystemExit(f"'{d}' holds no adapter_model.safetensors")
    cut = {}
    for key, w in load_file(str(weights_file)).items():
        if ".lora_A." in key and key.endswith("weight") and w.ndim == 2:
            if w.shape[0] % r:
                raise SystemExit(f"{weights_file}: {key} has {w.shape[0]} rows, not a multiple of r {r}")
            w = w.reshape(w.shape[0] // r, r, -1)[:, :rank].reshape(-1, w.shape[1])
        elif ".lora_B." in key and key.endswith("weight") and w.ndim == 2:
            if w.shape[1] % r:
                raise SystemExit(f"{weights_file}: {key} has {w.shape[1]} columns, not a multiple of r {r}")
            w = w.reshape(w.shape[0], r, -1)[:, :rank].reshape(w.shape[0], -1)
        cut[key] = w.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(cut, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({**config, "r": rank}, indent=2) + "\n")
    return out


def adapter_base(adapter_dir: str | Path, base: str = "") -> str:
    """The model an adapter was trained on: `base` when given, else its run's start/ (an upcycled moe stage keeps
    its starting model there; found even when the run directory was moved), else the one adapter_config.json names."""
    sibling = Path(adapter_dir).parent / "start"
    base = base or (str(sibling) if (sibling / "config.json").is_file() else "")
    base = base or _adapter_config(Path(adapter_dir)).get("base_model_name_or_path") or ""
    if not base:
        raise SystemExit(f"adapter '{adapter_dir}' names no base model (base_model_name_or_path): set `base`")
    return base


def merge_adapter(model, adapter_dir: str | Path, rank: int = 0):
    """`model` with the PEFT adapter of `adapter_dir` merged in (plain HF model out), cut to its leading `rank`
    components first when rank > 0."""
    import tempfile

    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        source = truncate_adapter(adapter_dir, rank, tmp) if rank else adapter_dir
        merged = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    return merged.eval()


def numel(p: torch.nn.Parameter) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it away (then `numel()` is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def local_numel(p: torch.nn.Parameter) -> int:
    """What this rank actually stores of a parameter: its ZeRO-3 shard if partitioned, else all of it."""
    shard = getattr(p, "ds_tensor", None)
    return int(shard.numel()) if shard is not None else int(p.numel())


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: forward 2N, activation gradients 2N, weight gradients 2N only where trainable.

    Embedding lookups cost no matmul FLOPs; the attention score/value matmuls add 12·layers·hidden·seq
    (forward + backward), as in the PaLM/Megatron MFU accounting. MoE experts count with the share a token
    actually uses (top_k / num_experts). A VLM's vision tower runs per image, not per token: it is left out, so
    a VLM's MFU is that of its projector and language model (a slight underestimate).
    """
    embed = model.get_input_embeddings()
    embed_ids = {id(p) for p in embed.parameters()}
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    active = getattr(cfg, "num_experts_per_tok", 0) / n_experts if n_experts else 1.0
    total, trainable = 0.0, 0.0
    for name, p in model.named_parameters():
        if id(p) in embed_ids or "vision_tower" in name:
            continue
        share = active if ".experts." in name else 1.0
        total += numel(p) * share
        trainable += numel(p) * share if p.requires_grad else 0
    layers, hidden = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)
    # tied lm_head shares the embedding matrix but still costs a matmul
    if getattr(cfg, "tie_word_embeddings", False):
        total += numel(embed.weight)
        trainable += numel(embed.weight) if embed.weight.requires_grad else 0
    return 4.0 * total + 2.0 * trainable + 12.0 * layers * hidden * seq_len


@torch.no_grad()
def generate_text(model_dir: str, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
    """Greedy answers of a causal LM directory to user prompts, through its chat template when it has one."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"  # generation continues from the right edge of every row
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot load model '{model_dir}': {str(e).splitlines()[0]}") from None
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if tok.chat_template else p + "\n" for p in prompts]
    answers = []
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        answers += tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def resolve_attn_implementation(requested: str) -> str:
    """`auto`: flash-attn 2 when it is installed and a GPU is present, else PyTorch SDPA."""
    import importlib.util

    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def activation_bytes(model, micro_batch_size: int, seq_len: int) -> int:
    """What one micro-batch's forward leaves for the backward, estimated per token at the model's dtype size `e`:

    - each decoder layer: attention e·(2h + 2·q + 2·kv) (norm input, q/k/v projection input, q, k, v, attention
      output; SDPA/flash keep no seq² scores), then its FFN: a dense SwiGLU e·(2h + 4·I) (norm input and output,
      gate, silu(gate), up, their product), an MoE block e·(2h + E) for norm and router plus top_k experts each
      e·(h + 4·I_expert);
    - the head: logits e·V, their float32 copy and log-softmax 8·V (transformers' loss upcasts), unless Liger's fused
      linear cross-entropy is on this model (then no logits exist);
    - a vision tower with trainable parameters, one image per sample: e·(8·h_v + 2·I_v) per patch and layer.

    It is an estimate of the largest tensors, not a bound: small ones (norm statistics, router weights, masks) are
    left out, and a Liger RMSNorm/SwiGLU keeps less. tests/test_pretrain.py compares it with the tensors autograd
    actually saves on a tiny model, and with the H100 anchor (Qwen2.5-0.5B shape, 8 × 2048 tokens: 44.6 GB, of a
    measured 51.8 GiB peak with ~7 GB of weights, gradients and Adam states; Liger removes 25 GB of logits)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    e = next(model.parameters()).element_size()
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    dense_ffn = 2 * h + 4 * cfg.intermediate_size
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    sparse = set()
    if n_experts:
        from semivlm.moe import moe_layer_indices

        sparse = set(moe_layer_indices(cfg))
        expert_width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        moe_ffn = 2 * h + n_experts + cfg.num_experts_per_tok * (h + 4 * expert_width)
    per_token = sum(2 * h + 2 * q + 2 * kv + (moe_ffn if i in sparse else dense_ffn) for i in range(layers)) * e
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused_ce = getattr(vars(base).get("forward"), "__module__", "").startswith("liger_kernel")
    per_token += 2 * h * e + (0 if fused_ce else (e + 8) * vocab)
    total = per_token * micro_batch_size * seq_len
    vision = getattr(model.config, "vision_config", None)
    tower = next((m for n, m in base.named_modules() if n.endswith("vision_tower")), None)
    if vision is not None and tower is not None and any(p.requires_grad for p in tower.parameters()):
        patches = (vision.image_size // vision.patch_size) ** 2 + 1
        total += micro_batch_size * patches * vision.num_hidden_layers * \
            (8 * vision.hidden_size + 2 * vision.intermediate_size) * e
    return int(total)


def wants_gradient_checkpointing(setting, model, micro_batch_size: int, seq_len: int, device) -> bool:
    """`auto`: on when one micro-batch's activations (`activation_bytes`) would take more than 60 % of the GPU's
    memory, the rest being left to weights, gradients, optimizer states (sharded under ZeRO) and the allocator: off
    for a 0.5B decoder at 8 × 2048 tokens on an 80 GiB GPU (44.7 GB; measured peak 51.8 GiB), on for an 8B one at
    4 × 2048 (54.7 GB). Checkpointing frees the decoder layers' share only; the logits stay. Off on CPU, where the debug
    shapes never come near the memory."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    return activation_bytes(model, micro_batch_size, seq_len) > 0.6 * torch.cuda.get_device_properties(device).total_memory


def compile_blocks(model) -> int:
    """Regional torch.compile: every block of each `...layers` ModuleList (decoder layers, vision encoder layers)
    compiled in place, as PyTorch's regional-compilation recipe does: identical blocks share compiled code, so
    compiling takes seconds, and parameter names (checkpoints, exports) stay those of the plain model."""
    blocks = [block for name, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList)
              and name.endswith("layers") for block in mod]
    for block in blocks:
        block.compile()
    return len(blocks)


def apply_liger(model, mode: str, zero_stage: int) -> str:
    """Swap in Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) when asked and possible.

    `auto` applies them on a GPU when liger-kernel is installed; `on` insists. Under ZeRO-3 the fused linear
    cross-entropy is left out: it reads lm_head.weight inside the top-level forward, where ZeRO-3 has not
    gathered it, so plain Liger cross-entropy is used instead. In an MoE, Liger's SwiGLU would swap the experts
    module for its own per-expert loop (undoing grouped_mm) and fails on dense layers without `experts`
    (Qwen3Moe's mlp_only_layers): the experts are left alone and only the dense MLPs get Liger's SwiGLU. Only this
    model instance is patched (see `_liger_on_instance_only`). Returns what was applied, for the log.
    """
    import importlib.util
    import inspect

    if mode == "off":
        return "off"
    available = importlib.util.find_spec("liger_kernel") is not None
    if not (available and torch.cuda.is_available()):
        if mode == "on":
            raise SystemExit("liger: 'on' needs liger-kernel installed (pip install '.[gpu]') and a CUDA GPU")
        return "off (" + ("no GPU" if available else "liger-kernel not installed") + ")"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    fused = zero_stage < 3
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(base.config.model_type)
    if patch is None:
        if mode == "on":
            raise SystemExit(f"liger: 'on' but liger-kernel has no kernels for model_type '{base.config.model_type}'")
        return f"off (no Liger kernels for {base.config.model_type})"
    moe = any(name.endswith(".experts") for name, _ in base.named_modules())
    kwargs = {"fused_linear_cross_entropy": fused, "cross_entropy": not fused, "swiglu": not moe}
    # Liger's own _apply_liger_kernel_to_instance keeps only the kwargs a patch function names (monkey_patch.py:4018
    # in 0.8.5), and the Llava patch names the text model's as **kwargs: swiglu=False was dropped there and the
    # text model patched with swiglu=True. A patch that takes **kwargs gets them all and hands them on.
    params = inspect.signature(patch).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    with _liger_on_instance_only(base):
        patch(model=base, **kwargs)
    dense_mlps = 0
    text = base.config.get_text_config()
    if moe and getattr(text, "hidden_act", None) in ("silu", "swish"):
        for name, module in base.named_modules():
            if name.endswith(".mlp") and not hasattr(module, "experts") and \
                    all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
                _patch_swiglu_module(module, LigerSwiGLUMLP)
                dense_mlps += 1
    return "on" + ("" if fused else " (no fused linear cross-entropy under ZeRO-3)") + \
        (f" (experts keep their experts_implementation; Liger SwiGLU on {dense_mlps} dense MLPs)" if moe else "")


_MISSING = object()


@contextmanager
def _liger_on_instance_only(model):
    """Undo the module-level half of a Liger patch, keeping its effect on `model` alone.

    Liger's patch functions also replace names in transformers' modelling modules (`modeling_qwen3.Qwen3RMSNorm =
    LigerRMSNorm`, `... .apply_rotary_pos_emb = liger_rotary_pos_emb`) and torch's `nn.functional.cross_entropy`,
    so every model built later in the process (the classification check's reload, evaluation on CPU) would be
    made of Triton-only parts. Here the modules get their own names back; this model's modules whose forward
    reads a replaced function get a forward that sees Liger's version; Liger's cross-entropy becomes this model's
    loss function only.
    """
    import sys
    from types import FunctionType, MethodType

    modules = {n: m for n, m in list(sys.modules.items()) if n.startswith("transformers.models.") and m is not None}
    before = {n: dict(vars(m)) for n, m in modules.items()}
    cross_entropy = torch.nn.functional.cross_entropy
    try:
        yield
    finally:
        liger_cross_entropy = torch.nn.functional.cross_entropy
        torch.nn.functional.cross_entropy = cross_entropy
        for name, mod in modules.items():
            old = before[name]
            replaced = {k: v for k, v in vars(mod).items() if old.get(k, _MISSING) is not v}
            for key in replaced:
                if key in old:
                    setattr(mod, key, old[key])
                else:
                    delattr(mod, key)
            functions = {k: v for k, v in replaced.items() if callable(v) and not isinstance(v, type)}
            for module in model.modules() if functions else ():
                forward = getattr(type(module), "forward", None)
                if "forward" in vars(module) or not isinstance(forward, FunctionType) or \
                        forward.__globals__ is not vars(mod) or not set(functions) & set(forward.__code__.co_names):
                    continue
                patched = FunctionType(forward.__code__, {**forward.__globals__, **functions}, forward.__name__,
                                       forward.__defaults__, forward.__closure__)
                patched.__kwdefaults__ = forward.__kwdefaults__
                module.forward = MethodType(patched, module)
        if liger_cross_entropy is not cross_entropy:
            loss_function = model.loss_function

            def liger_loss(*args, **kwargs):  # transformers' loss looks nn.functional.cross_entropy up at call time
                torch.nn.functional.cross_entropy = liger_cross_entropy
                try:
                    return loss_function(*args, **kwargs)
                finally:
                    torch.nn.functional.cross_entropy = cross_entropy

            model.loss_function = liger_loss


def load_adapter_weights(model, adapter: Path, log=print) -> None:
    """The adapter's weights (LoRA, and the modules its stage trained in full, e.g. routers) into this run's freshly
    wrapped model, name by name: every trained parameter must find one and every saved weight a parameter, or the
    run would start from something other than the adapter. Names are compared without PEFT's wrapper segments
    (base_model.model., the adapter name, modules_to_save), which differ between a saved adapter and a live model."""
    from safetensors.torch import load_file

    def plain(name: str) -> str:
        return re.sub(r"\.(default|modules_to_save|original_module)(?=\.)", "", name.removeprefix("base_model.model."))

    saved = {plain(k): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    trained = {plain(n): p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != trained.keys():
        extra, missing = sorted(saved.keys() - trained.keys()), sorted(trained.keys() - saved.keys())
        raise SystemExit(f"{adapter} does not match what this run trains (its weights not trained here: {extra[:2]}; "
                         f"trained here, not in it: {missing[:2]}): use the LoRA settings of the stage that wrote it")
    for name, param in trained.items():
        gathered = contextlib.nullcontext()
        if hasattr(param, "ds_id"):  # partitioned by ZeRO-3: every rank joins the gather, the main process sets it
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0)
        with gathered, torch.no_grad():
            param.copy_(saved[name].reshape(param.shape).to(param.dtype))
    log(f"continuing adapter {adapter}: {len(trained)} tensors (LoRA and modules trained in full)")
