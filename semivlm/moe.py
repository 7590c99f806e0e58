"""Stage III of MoE-LLaVA as plain Hugging Face MoE models: sparse upcycling, routing telemetry, auxiliary losses.

`upcycle` turns a dense decoder (a causal LM, or the text half of a Llava) into the matching transformers MoE
architecture (llama, mistral -> mixtral; qwen3 -> qwen3_moe; qwen2 -> qwen2_moe), each expert a copy of its layer's
FFN. The copy is exact because these routers renormalise the top-k weights to sum to 1 (sum_k w_k FFN(x) = FFN(x)),
provided every config field is carried over (MixtralConfig defaults rope_theta=1e6, Llama 1e4): `uncarried_fields`.
Fused layout in transformers 5.17, the same for the three MoE classes: `mlp.experts.gate_up_proj` (E, 2I, H) =
cat(gate_proj.weight, up_proj.weight), `mlp.experts.down_proj` (E, H, I), router `mlp.gate.weight` (E, H), whose
module returns (logits, top-k weights, top-k indices).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
from functools import partial
from pathlib import Path

import torch

# dense model_type -> MoE model_type
MOE_FAMILY = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}

# Dense fields the MoE config class has no field for. Dropping each is exact only because `moe_text_config`
# refuses the values that would matter; every other dense field must reappear unchanged (`uncarried_fields`).
DROPPED_FIELDS = {"llama": {"mlp_bias", "attention_bias",  # must be False: Mixtral has no such biases
                             "pretraining_tp"},  # read by no transformers 5 modelling code
                   "mistral": set(), "qwen3": set(), "qwen2": set()}
# Bookkeeping, rewritten on construction or save. Sliding-window fields are compared by what they mean per layer
# (`sliding_windows`), because the families spell the same thing differently (Qwen2Moe stores 0 for "off").
_BOOKKEEPING = {"architectures", "model_type", "transformers_version", "_name_or_path", "dtype"}
_WINDOW_FIELDS = {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}
# Fields of real checkpoints that no MoE config class declares and no modelling code reads: carried over as plain
# attributes, unchanged (configs keep unknown keyword arguments). `unk_token_id` is tokenizer metadata every HF
# checkpoint writes; `_model_name_or_path` is the GGUF file's general.name (transformers' GGUF loader). Any other
# undeclared field still stops the upcycling (`uncarried_fields`), since it may change what the dense model computes.
METADATA_FIELDS = {"unk_token_id", "_model_name_or_path"}

# A parameter of an MoE block: `...layers.<i>.mlp.<part>` (routers, fused experts, Qwen2Moe's empty shared expert).
_MOE_KEY = re.compile(r"^(?P<mlp>.*\.layers\.\d+\.mlp)\.(?P<part>experts\.gate_up_proj|experts\.down_proj|gate\.weight"
                      r"|shared_expert\.\w+\.weight|shared_expert_gate\.weight)$")
_MOE_BLOCK = re.compile(r"layers\.(\d+)\.mlp$")


def sliding_windows(config) -> list:
    """Per decoder layer, the attention window in tokens (None: full attention), as the modelling code applies it."""
    n = config.num_hidden_layers
    if config.model_type == "llama":  # no sliding attention, whatever the config says
        return [None] * n
    window = getattr(config, "sliding_window", None) or None  # Qwen2Moe spells "off" as 0
    if config.model_type in ("qwen2", "qwen3", "qwen2_moe"):  # chosen per layer by layer_types
        return [window if t == "sliding_attention" else None for t in config.layer_types]
    return [window] * n  # mistral, mixtral, qwen3_moe: one window for every layer


def moe_layer_indices(config) -> list[int]:
    """Indices of the decoder layers whose FFN is sparse under this (MoE text) config."""
    n = config.num_hidden_layers
    if config.model_type == "mixtral":
        return list(range(n))
    return [i for i in range(n) if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]


def moe_text_config(dense_config, num_experts: int = 4, top_k: int = 2, moe_every: int = 1,
                    router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 0.0):
    """The MoE config that reproduces `dense_config` exactly, every dense field carried over.

    moe_every=2 makes layers 0, 2, 4, ... sparse and the others dense (MoE-LLaVA's moe_mode="sparse",
    range(0, L, 2)); it is spelled explicitly as `decoder_sparse_step=1, mlp_only_layers=[1, 3, ...]`.
    Mixtral has no dense layers, so Llama/Mistral need moe_every=1. `router_z_loss_coef` is stored as a plain
    config attribute for the training script (no HF MoE class here uses a z-loss).
    """
    from transformers import CONFIG_MAPPING

    family = dense_config.model_type
    if family not in MOE_FAMILY:
        raise ValueError(f"cannot upcycle model_type '{family}': supported are {sorted(MOE_FAMILY)}")
    if not 2 <= num_experts or not 1 <= top_k <= num_experts:
        raise ValueError(f"need num_experts >= 2 and 1 <= top_k <= num_experts, got {num_experts=}, {top_k=}")
    n = dense_config.num_hidden_layers
    if not 1 <= moe_every <= n:
        raise ValueError(f"moe_every must be between 1 and num_hidden_layers={n}, got {moe_every}")
    target = MOE_FAMILY[family]
    if target == "mixtral" and moe_every != 1:
        raise ValueError(f"moe_every={moe_every} needs dense layers between the sparse ones, which Mixtral cannot "
                         f"express (every Mixtral layer is sparse): use moe_every=1 for {family}")
    for field in ("mlp_bias", "attention_bias"):
        if family == "llama" and getattr(dense_config, field, False):
            raise ValueError(f"cannot upcycle llama with {field}=True exactly: Mixtral has no {field.split('_')[0]} "
                             f"biases")
    windows = sliding_windows(dense_config)
    if target in ("mixtral", "qwen3_moe") and len(set(windows)) > 1:
        raise ValueError(f"{family} mixes full and sliding-window layers ({windows}); {target} applies one "
                         f"window to every layer, so the copy would not be exact")

    fields = {f.name for f in dataclasses.fields(CONFIG_MAPPING[target])}
    kw = {k: v for k, v in dense_config.to_dict().items()
          if (k in fields or k in METADATA_FIELDS) and k not in _BOOKKEEPING}
    # Qwen2Moe/Qwen3Moe read head_dim with getattr (no declared field): pass it so a non-default value survives
    if getattr(dense_config, "head_dim", None) is not None:
        kw["head_dim"] = dense_config.head_dim
    dense_only = [i for i in range(n) if i % moe_every != 0]
    kw.update(output_router_logits=False, router_aux_loss_coef=router_aux_loss_coef,
              router_z_loss_coef=router_z_loss_coef, num_experts_per_tok=top_k)
    if target == "mixtral":  # always renormalises top-k weights
        kw.update(num_local_experts=num_experts, router_jitter_noise=0.0, sliding_window=windows[0])
    else:  # renormalised top-k weights are what makes the copies exact
        kw.update(num_experts=num_experts, norm_topk_prob=True, moe_intermediate_size=dense_config.intermediate_size,
                  decoder_sparse_step=1, mlp_only_layers=dense_only)
    if target == "qwen3_moe":
        kw.update(use_sliding_window=windows[0] is not None, sliding_window=windows[0])
    if target == "qwen2_moe":
        # Qwen2Moe adds sigmoid(gate(x)) * shared_expert(x) to the routed output. A shared expert of width 0 is an
        # exact zero (saved as empty tensors, reloads cleanly), which leaves MoE-LLaVA's routed-only FFN. The
        # Qwen2 dense attention always has q/k/v biases; layer_types are passed explicitly so the per-layer
        # windows stay the dense ones (Qwen2Moe's own default pattern differs).
        kw.update(shared_expert_intermediate_size=0, qkv_bias=True, layer_types=list(dense_config.layer_types),
                  use_sliding_window=any(w is not None for w in windows))
    return CONFIG_MAPPING[target](**kw)


def uncarried_fields(dense_config, moe_config) -> list[str]:
    """Dense config fields whose value the MoE config does not reproduce; [] when the copy can be exact.
    DROPPED_FIELDS[family] are skipped; sliding-window fields are compared as per-layer windows."""
    skip = _BOOKKEEPING | _WINDOW_FIELDS | DROPPED_FIELDS.get(dense_config.model_type, set())
    moe = moe_config.to_dict()
    missing = [k for k, v in dense_config.to_dict().items() if k not in skip and (k not in moe or moe[k] != v)]
    if sliding_windows(dense_config) != sliding_windows(moe_config):
        missing.append("sliding_window")
    return missing


def upcycle(model, num_experts: int = 4, top_k: int = 2, moe_every: int = 1, router_init_std: float = 0.01,
            seed: int = 0, router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 0.0):
    """A new MoE model equal to `model` (a dense *ForCausalLM, or a LlavaForConditionalGeneration around one):
    vision tower, projector, attention, norms, embeddings and lm_head copied, every expert a copy of its layer's
    MLP, routers N(0, router_init_std) from `seed`. Built without random init and filled tensor by tensor; a
    weight left unfilled or unused is an error."""
    from transformers import AutoModelForCausalLM, PreTrainedModel
    from transformers.initialization import no_init_weights

    is_llava = isinstance(model, PreTrainedModel) and model.config.model_type == "llava"
    if not is_llava and not (isinstance(model, PreTrainedModel) and type(model).__name__.endswith("ForCausalLM")):
        raise ValueError(f"upcycle needs a *ForCausalLM or LlavaForConditionalGeneration, got {type(model).__name__}"
                         f" (unwrap PEFT/DeepSpeed and merge any LoRA first)")
    text_config = model.config.text_config if is_llava else model.config
    moe_config = moe_text_config(text_config, num_experts, top_k, moe_every, router_aux_loss_coef, router_z_loss_coef)
    if bad := uncarried_fields(text_config, moe_config):  # a bug guard: moe_text_config should never allow this
        raise RuntimeError(f"dense config fields not carried over to {moe_config.model_type}: {bad}")

    device, dtype = next(model.parameters()).device, model.dtype
    with no_init_weights(), torch.device(device):
        if is_llava:
            config = copy.deepcopy(model.config)
            config.text_config = moe_config
            new = type(model)._from_config(config, dtype=dtype)
        else:
            new = AutoModelForCausalLM.from_config(moe_config, dtype=dtype)
    new.tie_weights()  # no_init_weights also skips the tying that init_weights does (tie_word_embeddings)

    src = model.state_dict()
    used = set()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in new.named_parameters():  # keep each dtype, e.g. an fp32 vision tower beside a bf16 LM
            m = _MOE_KEY.match(key)
            ref = src.get(f"{m['mlp']}.down_proj.weight" if m else key)
            if ref is not None and ref.dtype != param.dtype:
                param.data = param.data.to(ref.dtype)
        for key, dst in new.state_dict().items():  # shares storage with the new parameters
            m = _MOE_KEY.match(key)
            mlp, part = (m["mlp"], m["part"]) if m else (None, None)
            if part is None:
                if key not in src or src[key].shape != dst.shape:
                    have = tuple(src[key].shape) if key in src else "missing"
                    raise RuntimeError(f"upcycle: {key} {tuple(dst.shape)} has no dense source (dense: {have})")
                dst.copy_(src[key])
                used.add(key)
            elif part == "experts.gate_up_proj":  # (E, 2I, H): broadcast over experts
                gate, up = src[f"{mlp}.gate_proj.weight"], src[f"{mlp}.up_proj.weight"]
                dst[:, : gate.shape[0]].copy_(gate)
                dst[:, gate.shape[0]:].copy_(up)
                used |= {f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"}
            elif part == "experts.down_proj":  # (E, H, I)
                dst.copy_(src[f"{mlp}.down_proj.weight"])
                used.add(f"{mlp}.down_proj.weight")
            elif part == "gate.weight":  # the router
                dst.copy_(torch.randn(dst.shape, generator=gen) * router_init_std)
            elif part == "shared_expert_gate.weight":  # Qwen2Moe: scales the width-0 (all-zero) shared expert
                dst.zero_()
            elif dst.numel():  # Qwen2Moe shared_expert.*: width 0, nothing to fill
                raise RuntimeError(f"upcycle: {key} should be empty (shared expert of width 0), got {dst.shape}")
    if unused := sorted(set(src) - used):
        raise RuntimeError(f"upcycle: dense weights with no place in the MoE model: {unused[:8]}")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def upcycled_already(source, num_experts: int, top_k: int, moe_every: int) -> bool:
    """Whether init_from is an MoE VLM already (a moe stage's final/): the moe stage then trains it as it is (DPO
    after the moe stage, or more of it); upcycling it again would make every expert a copy of one FFN and reset
    the routers. num_experts, top_k and moe_every (the run's settings) must describe it, else they would be ignored
    without a word."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(source).text_config
    if text.model_type not in MOE_FAMILY.values():
        return False
    experts = getattr(text, "num_local_experts", None) or text.num_experts
    sparse = moe_layer_indices(text)
    if (experts, text.num_experts_per_tok, sparse) != (num_experts, top_k, list(range(0, text.num_hidden_layers, moe_every))):
        raise SystemExit(f"init_from {source} is an MoE VLM already ({experts} experts, top-{text.num_experts_per_tok}"
                         f", sparse layers {sparse}), trained as it is: num_experts {num_experts}, top_k "
                         f"{top_k}, moe_every {moe_every} describe another one; set them to its values")
    return True


def continued_expert_adapter(init_from, r: int, alpha: int):
    """The expert-LoRA adapter this run goes on training: with moe_lora_r > 0 and init_from the final/ of a LoRA moe
    stage (its run_config.json says so), that stage's output_dir/adapter. The run then starts from the adapter's base
    plus the adapter — the policy equals the merged final/ — and trains the same low-rank update further, rather
    than a fresh adapter on top of the merge (so its export is again base + one rank-r update). None: start from
    init_from's weights (moe_lora_r > 0: a fresh adapter)."""
    final = Path(init_from)
    try:
        made_by = json.loads((final / "run_config.json").read_text())
    except (OSError, ValueError):
        return None
    if made_by.get("stage") != "moe" or not made_by.get("moe_lora_r"):
        return None
    adapter = final.parent / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"init_from {final} was exported by a LoRA moe stage, whose adapter this run continues, but "
                         f"{adapter}/adapter_config.json is missing")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    if (saved.get("r"), saved.get("lora_alpha")) != (r, alpha):
        raise SystemExit(f"{adapter} has r {saved.get('r')}, lora_alpha {saved.get('lora_alpha')}; this run continues "
                         f"it with moe_lora_r {r}, moe_lora_alpha {alpha}: set them equal")
    return adapter


def _moe_blocks(model) -> list[tuple[str, int, torch.nn.Module]]:
    """(module name, layer index, block) of every sparse MoE block, found by name and class so that it works
    through PEFT and DeepSpeed wrappers; an error when there is none."""
    blocks = [(name, int(m.group(1)), module) for name, module in model.named_modules()
              if (m := _MOE_BLOCK.search(name)) and type(module).__name__.endswith("SparseMoeBlock")]
    if not blocks:
        raise ValueError(f"no sparse MoE blocks (*SparseMoeBlock at layers.<i>.mlp) in {type(model).__name__}: "
                         f"upcycle the model first")
    return blocks


def set_experts_implementation(model, device_type: str, requested: str = "auto") -> str:
    """How the fused experts run: "auto" is grouped_mm on CUDA, eager elsewhere; returns the choice. Calls
    transformers' `set_experts_implementation` on the sub-model owning the experts: on the Llava wrapper itself it
    raises for grouped_mm (the Llava modelling file has no experts of its own)."""
    from transformers import PreTrainedModel

    choice = ("grouped_mm" if device_type == "cuda" else "eager") if requested == "auto" else requested
    if choice not in ("eager", "grouped_mm", "batched_mm"):
        raise ValueError(f"experts implementation '{requested}' not one of auto, eager, grouped_mm, batched_mm")
    _moe_blocks(model)  # an error for a dense model
    for owner in [m for m in model.modules() if isinstance(m, PreTrainedModel) and m._can_set_experts_implementation()]:
        owner.set_experts_implementation(choice)
    return choice


def register_zero3_leaf_modules(model) -> list[str]:
    """Mark the sparse-MoE block classes as ZeRO-3 leaves (else ranks routing no token to an expert hang)."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(block) for _, _, block in _moe_blocks(model)}, key=lambda c: c.__name__)
    set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def expert_and_router_parameter_names(model) -> list[str]:
    """Names (as in model.named_parameters()) of the router and expert weights, which stage III trains.
    Qwen2Moe's width-0 shared expert and its gate are left out: they compute nothing. With everything before the
    first MoE block frozen, call `model.enable_input_require_grads()`: under ZeRO-3 the backward otherwise finds
    the expert weights still partitioned ("size of tensor a (0) must match ...")."""
    return [f"{name}.{sub}.{p}" for name, _, block in _moe_blocks(model)
            for sub in ("gate", "experts") for p, _ in getattr(block, sub).named_parameters()]


def expert_lora_config(model, r: int = 16, alpha: int = 32):
    """A PEFT LoraConfig that puts LoRA on the fused expert tensors (PEFT `target_parameters`)."""
    from peft import LoraConfig

    params = sorted({p for _, _, block in _moe_blocks(model) for p, _ in block.experts.named_parameters()})
    if params != ["down_proj", "gate_up_proj"]:
        raise ValueError(f"unexpected fused expert parameters {params}: expected gate_up_proj and down_proj")
    # lora_dropout must be 0: PEFT's parameter-targeting LoRA has no dropout path
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                      target_parameters=[f"mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")])


def load_balancing_loss(logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's Switch/Mixtral aux loss, transformers' `load_balancing_loss_func` formula: num_experts *
    sum_e (top-k assignments to e per token) * (mean router probability of e), padding excluded; top_k if balanced."""
    probs = torch.softmax(logits.float(), dim=-1)
    w = probs.new_ones(probs.shape[0]) if token_mask is None else token_mask.float()
    picked = torch.zeros_like(probs).scatter_(1, torch.topk(probs, top_k, dim=-1).indices, 1.0)  # (T, E) 0/1
    n = w.sum().clamp(min=1)
    return probs.shape[-1] * ((w @ picked / n) * (w @ probs / n)).sum()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, padding excluded."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    w = torch.ones_like(z) if token_mask is None else token_mask.float()
    return (z * w).sum() / w.sum().clamp(min=1)


class RouterProbe:
    """Forward hooks on every router: differentiable aux/z losses of the current step, routing statistics of many.

        probe = RouterProbe(model)                     # model may be wrapped by PEFT or DeepSpeed
        probe.start(attention_mask, input_ids == model.config.image_token_id)
        out = model(**batch); aux, z = probe.losses()  # each the mean over MoE layers
        (out.loss + aux_coef * aux + z_coef * z).backward(); probe.summary()

    Each router is recorded once per `start()`: activation checkpointing re-runs the routers during backward, and
    those calls are ignored, so nothing is double counted and the losses keep the real forward's logits (which
    non-reentrant checkpointing, the transformers 5 default, keeps differentiable). So: `start()` before every
    forward, that step's backward before the next `start()`. Router calls while not started are ignored.
    """

    def __init__(self, model):
        self.routers = [(layer, block.gate) for _, layer, block in _moe_blocks(model)]
        self.num_experts, self.top_k = self.routers[0][1].num_experts, self.routers[0][1].top_k
        self._handles = [gate.register_forward_hook(partial(self._hook, layer)) for layer, gate in self.routers]
        self._armed, self._logits, self._mask, self._image = False, {}, None, None
        self.reset()

    def reset(self):
        """Forget the accumulated statistics (not the current step's logits)."""
        # kept on the device and summed there: no host sync per layer per step
        self._counts = {}  # layer -> (3, E) top-k assignments of image, text, all tokens
        self._tokens = {}  # layer -> (3,) image, text, all tokens
        self._aux = {}     # layer -> (sum of per-forward aux loss, forwards)

    def remove(self):
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()

    def start(self, attention_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
              record: bool = True):
        """Arm the probe for one forward. Masks are (batch, seq) over the LM's input positions (after Llava has
        expanded <image>): attention_mask 1 = real token, image_mask True = image token. `record=False` gives the
        losses without adding to the statistics (held-out evaluation)."""
        if attention_mask is not None and image_mask is not None and attention_mask.shape != image_mask.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and image_mask "
                             f"{tuple(image_mask.shape)} must have the same shape")
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        self._image = None if image_mask is None else image_mask.reshape(-1).bool()
        self._logits, self._armed, self._record = {}, True, record

    def _hook(self, layer, module, inputs, output):
        if not self._armed or layer in self._logits:
            return  # not started, or the activation-checkpointing recompute of a layer already seen
        logits, _, indices = output
        rows = logits.shape[0]
        for name, mask in (("attention_mask", self._mask), ("image_mask", self._image)):
            if mask is not None and mask.numel() != rows:
                raise ValueError(f"RouterProbe: {name} covers {mask.numel()} positions but layer {layer}'s router "
                                 f"saw {rows} tokens (masks must match the LM input after image expansion)")
        self._logits[layer] = logits
        if not self._record:
            return
        with torch.no_grad():
            dev = logits.device
            valid = torch.ones(rows, dtype=torch.bool, device=dev) if self._mask is None else self._mask.to(dev)
            image = torch.zeros_like(valid) if self._image is None else self._image.to(dev) & valid
            groups = torch.stack([image, valid & ~image, valid]).float()  # (3, T)
            picked = torch.zeros(rows, self.num_experts, device=dev).scatter_(1, indices, 1.0)  # the real routing
            aux, forwards = self._aux.get(layer, (0.0, 0))
            self._aux[layer] = (aux + load_balancing_loss(logits, self.top_k, valid), forwards + 1)
            self._counts[layer] = self._counts.get(layer, 0.0) + groups @ picked
            self._tokens[layer] = self._tokens.get(layer, 0.0) + groups.sum(1)

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux, z) of the forward since `start()`, each the mean over MoE layers; differentiable."""
        if not self._logits:
            raise RuntimeError("RouterProbe: no router logits since start(): call probe.start(...) before forward")
        aux, z = [], []
        for layer, logits in sorted(self._logits.items()):
            mask = None if self._mask is None else self._mask.to(logits.device)
            aux.append(load_balancing_loss(logits, self.top_k, mask))
            z.append(router_z_loss(logits, mask))
        # training, routers trainable, yet no grad on the logits: the forward ran under no_grad (reentrant checkpoint)
        first, gate = self.routers[0]
        trainable = torch.is_grad_enabled() and gate.training and gate.weight.requires_grad
        if trainable and first in self._logits and not self._logits[first].requires_grad:
            raise RuntimeError("RouterProbe: router logits carry no gradient although the routers are trainable — "
                               "reentrant activation checkpointing runs the forward without grad; use "
                               "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")
        return torch.stack(aux).mean(), torch.stack(z).mean()

    def all_reduce(self, reduce) -> None:
        """Sum the statistics over ranks in place: `reduce(tensor)` is a summing collective such as
        `partial(accelerator.reduce, reduction="sum")`; every rank must call it, with the same MoE layers seen."""
        for layer in sorted(self._counts):
            dev = self._counts[layer].device
            aux, forwards = self._aux[layer]
            flat = torch.cat([self._counts[layer].reshape(-1), self._tokens[layer],
                              torch.tensor([float(aux), float(forwards)], device=dev)])
            flat = reduce(flat)
            e = self.num_experts
            self._counts[layer] = flat[:3 * e].reshape(3, e)
            self._tokens[layer] = flat[3 * e:3 * e + 3]
            self._aux[layer] = (float(flat[-2]), int(flat[-1]))

    def summary(self) -> dict:
        """JSON-able routing statistics accumulated since `reset()`. Shares are over top-k assignments (each token
        counts top_k times) and sum to 1; a modality with no tokens gets None."""
        layers, groups = [], ("image", "text", "all")
        for layer in sorted(self._counts):
            counts, tokens = self._counts[layer].tolist(), self._tokens[layer].tolist()
            entry = {"layer": layer, **{g: [round(c / sum(row), 6) for c in row] if sum(row) else None
                                        for g, row in zip(groups, counts)}}
            entry["tokens"] = {g: int(n) for g, n in zip(groups, tokens)}
            entry["aux_loss_mean"] = float(self._aux[layer][0]) / self._aux[layer][1]
            layers.append(entry)
        aux = [e["aux_loss_mean"] for e in layers]
        return {"num_experts": self.num_experts, "top_k": self.top_k, "layers": layers,
                "aux_loss_mean": sum(aux) / len(aux) if aux else None}


def routing_scalars(summary: dict) -> dict[str, float]:
    """A RouterProbe summary as flat tracker scalars: `routing/layer{L}/{image|text}/expert{e}` shares (what the log
    line prints; a modality without tokens is left out) and `routing/layer{L}/aux_loss`."""
    out = {}
    for layer in summary["layers"]:
        prefix = f"routing/layer{layer['layer']}"
        for modality in ("image", "text"):
            out.update({f"{prefix}/{modality}/expert{e}": share for e, share in enumerate(layer[modality] or [])})
        out[f"{prefix}/aux_loss"] = layer["aux_loss_mean"]
    return out


# ---------------------------------------------------------------- experts as per-expert Linears (LoRA dropout, QLoRA)
#
# transformers 5.17 stores each MoE block's experts as two fused 3-D parameters. PEFT reaches them only through
# `target_parameters` (ParamWrapper: W + s·B·A formed per forward, no dropout, since dropout(x) cannot be factored
# out of a merged weight), and bitsandbytes quantises nn.Linear modules, not 3-D tensors. So for expert-LoRA dropout
# and for nf4 the fused module is swapped for E small SwiGLU MLPs of nn.Linear (`unfuse_experts`), whose forward is
# the eager fused forward term by term, and swapped back for the export (`fuse_experts`), which writes plain
# Mixtral/Qwen3Moe weights. The cost: no grouped_mm for these runs (the eager per-expert loop, which is what the fused
# module runs on CPU anyway), and, transiently while converting one block, a second copy of its expert weights.

def routing_artifacts(probe: RouterProbe, reduce_sum, log):
    """The training loop's `artifacts` hook of an MoE run: at every save, on every rank, the probe's counts summed over
    ranks (reduce_sum) become routing.json beside the checkpoint, one log line per layer, and scalars for the trackers;
    then the counts restart. The export right after a checkpoint of the same step gets that checkpoint's file."""
    last: dict = {}

    def files() -> tuple[dict[str, str], dict[str, float]]:
        probe.all_reduce(reduce_sum)
        summary = probe.summary()
        probe.reset()
        if not summary["layers"] and last:
            return dict(last), {}
        for layer in summary["layers"]:
            shares = {k: "/".join(f"{x:.2f}" for x in layer[k]) if layer[k] else "-" for k in ("image", "text")}
            log(f"routing layer {layer['layer']} | image tokens {shares['image']} | text tokens {shares['text']} | "
                f"aux {layer['aux_loss_mean']:.3f}")
        last["routing.json"] = json.dumps(summary, indent=1) + "\n"
        return dict(last), routing_scalars(summary)
    return files


class ExpertMLP(torch.nn.Module):
    """One expert: down(act(gate(x)) * up(x)), the rows of the fused gate_up_proj / down_proj of its index."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype, device):
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = torch.nn.Linear(hidden, intermediate, **kw)
        self.up_proj = torch.nn.Linear(hidden, intermediate, **kw)
        self.down_proj = torch.nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(torch.nn.ModuleList):
    """The fused experts module as a list of ExpertMLP (parameter names `experts.<e>.gate_proj.weight`, ...): called
    like the fused module, (hidden_states, top_k_index, top_k_weights) -> hidden_states, and computing what its eager
    forward computes. The emptied fused module is kept (outside the module tree) to be refilled by `fuse_experts`."""

    def __init__(self, fused: torch.nn.Module):
        e, two_i, h = fused.gate_up_proj.shape
        i = two_i // 2
        w = fused.gate_up_proj
        super().__init__(ExpertMLP(h, i, fused.act_fn, w.dtype, w.device) for _ in range(e))
        with torch.no_grad():
            for k, expert in enumerate(self):
                expert.gate_proj.weight.copy_(fused.gate_up_proj[k, :i])
                expert.up_proj.weight.copy_(fused.gate_up_proj[k, i:])
                expert.down_proj.weight.copy_(fused.down_proj[k])
        self.num_experts = e
        self._fused = (fused,)  # a tuple: not registered as a submodule, so not in state_dict/parameters
        for name in ("gate_up_proj", "down_proj"):  # the fused copy is freed; fuse_experts gives it new tensors
            setattr(fused, name, torch.nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            top_k_pos, token_idx = torch.where(expert_mask[e])
            out = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def unfuse_experts(model) -> int:
    """Replace every MoE block's fused experts by UnfusedExperts (in place); returns the number of blocks. The model
    must be whole on this process (not ZeRO-3-partitioned)."""
    blocks = _moe_blocks(model)
    for _, _, block in blocks:
        if not isinstance(block.experts, UnfusedExperts):
            if getattr(block.experts, "ds_id", None) is not None or getattr(block.experts.gate_up_proj, "ds_id", None):
                raise ValueError("unfuse_experts needs whole (not ZeRO-3-partitioned) expert weights")
            block.experts = UnfusedExperts(block.experts)
    return len(blocks)


def fuse_experts(model) -> int:
    """The inverse of `unfuse_experts` for plain (merged, unquantised) per-expert Linears: each block gets its
    transformers experts module back, filled with the stacked weights; returns the number of blocks."""
    blocks = _moe_blocks(model)
    for _, _, block in blocks:
        if isinstance(block.experts, UnfusedExperts):
            unfused, (fused,) = block.experts, block.experts._fused
            for e in unfused:
                if any(type(m) is not torch.nn.Linear for m in (e.gate_proj, e.up_proj, e.down_proj)):
                    raise ValueError(f"fuse_experts needs plain nn.Linear experts (merge LoRA, export unquantised), "
                                     f"got {type(e.gate_proj).__name__}")
            with torch.no_grad():
                fused.gate_up_proj = torch.nn.Parameter(torch.stack(
                    [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in unfused]))
                fused.down_proj = torch.nn.Parameter(torch.stack([e.down_proj.weight for e in unfused]))
            block.experts = fused
    return len(blocks)


# LoRA targets on per-expert Linears, and on the decoder's attention (QLoRA under train_attention)
EXPERT_LORA_TARGETS = r".*\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)"
ATTENTION_LORA_TARGETS = r".*language_model.*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


def unfused_expert_lora_config(r: int, alpha: int, dropout: float, attention: bool = False):
    """Standard PEFT LoRA (with dropout) on every per-expert Linear of `unfuse_experts`, and on attention if asked."""
    from peft import LoraConfig

    targets = f"({EXPERT_LORA_TARGETS}|{ATTENTION_LORA_TARGETS})" if attention else EXPERT_LORA_TARGETS
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)


# ---------------------------------------------------------------- QLoRA: nf4 decoder layers

def check_nf4(device) -> str:
    """bitsandbytes importable and able to quantise to nf4 and run a 4-bit matmul on `device`; returns its version.
    Raises SystemExit with one line otherwise."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise SystemExit(f"quantization: nf4 needs bitsandbytes (pip install bitsandbytes==0.50.2): {e}") from None
    try:
        probe = nf4_linear(torch.nn.Linear(64, 64, bias=False), device)
        probe(torch.ones(2, 64, device=device))
    except Exception as e:  # noqa: BLE001  (each backend fails its own way: NotImplementedError, RuntimeError, ...)
        raise SystemExit(f"quantization: nf4: bitsandbytes {bnb.__version__} cannot quantise or run 4-bit layers on "
                         f"device '{device}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return bnb.__version__


def experts_unfused(cfg) -> bool:
    """Expert LoRA on per-expert Linears (unfuse_experts): needed for its dropout and for nf4. Otherwise LoRA goes on
    the fused tensors (PEFT target_parameters), which keeps grouped_mm. cfg: train_moe.MoEConfig."""
    return cfg.stage == "moe" and cfg.moe_lora_r > 0 and (cfg.moe_lora_dropout > 0 or cfg.quantization == "nf4")


def check_lora_settings(cfg, zero_stage: int, device) -> None:
    """One line for each LoRA/QLoRA setting of a train_moe.MoEConfig that cannot run: nf4 without LoRA, with ZeRO-3,
    or without a working bitsandbytes on this device; expert-LoRA dropout without expert LoRA or under ZeRO-3."""
    rank = "moe_lora_r" if cfg.stage == "moe" else "lora_r"
    if cfg.moe_lora_dropout and cfg.moe_lora_r <= 0:
        raise SystemExit("moe_lora_dropout needs expert LoRA: set moe_lora_r > 0")
    if cfg.quantization == "nf4":
        if getattr(cfg, rank) <= 0:
            raise SystemExit(f"quantization: nf4 (QLoRA) trains LoRA on a frozen 4-bit base: set {rank} > 0")
        if zero_stage == 3:  # ZeRO-3 would partition the packed 4-bit weights and their quant states
            raise SystemExit("quantization: nf4 is not supported under ZeRO-3; use ds_configs/zero2.json or one GPU")
        check_nf4(device)
    if experts_unfused(cfg) and zero_stage == 3:  # the conversion needs whole, unpartitioned experts
        raise SystemExit("moe_lora_dropout > 0 is not supported under ZeRO-3 (the experts are converted to per-expert "
                         "Linears after loading); use ds_configs/zero2.json, or moe_lora_dropout 0")


def nf4_linear(linear: torch.nn.Linear, device):
    """`linear` as a bitsandbytes Linear4bit: nf4, double quantisation (compress_statistics), bf16 compute,
    quantised on `device` (bitsandbytes quantises when the weight first moves to a device)."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                 module=q).to(device)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    # bitsandbytes' CPU inference repacking (taken under no_grad on AVX512-BF16 CPUs) fails for an input width that
    # is not a multiple of 64 (the debug recipe's FFN width 352: "shape '[128, 5]' is invalid for input of size 704"
    # at the first held-out evaluation): evaluation runs the training kernel instead
    q.support_avx512bf16_for_cpu = False
    # checkpoints leave the frozen 4-bit weight out: a resumed run quantises the same unquantised start again. Saved,
    # it would not load back: every layer's quant_map is one shared nf4 code tensor (safetensors' strict load reports
    # duplicated names), and on CPU bitsandbytes repacks the weight into another shape at the first forward
    q._save_to_state_dict = types.MethodType(_bias_only, q)
    q.register_load_state_dict_pre_hook(_keep_own_weight)
    return q


def _bias_only(self, destination, prefix, keep_vars):
    if self.bias is not None:
        destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


def _keep_own_weight(module, state_dict, prefix, *args):
    state_dict[prefix + "weight"] = module.weight  # loads onto itself: nothing missing, nothing changed


def quantize_nf4(model, device) -> int:
    """Every nn.Linear inside the decoder layers (attention, dense MLPs, per-expert Linears after `unfuse_experts`)
    replaced by its nf4 Linear4bit, in place; returns how many. Routers (plain parameters), embeddings, lm_head,
    norms, the projector and the vision tower keep their precision."""
    layer = re.compile(r"(^|\.)layers\.\d+\.")  # decoder layers of a causal LM or of a Llava's language model
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and layer.search(n)
             and "vision_tower" not in n and "multi_modal_projector" not in n]
    for name in names:
        parent, child = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, child, nf4_linear(getattr(owner, child), device))
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit targets with its bnb LoRA layers
    return len(names)


def parameter_bytes(model) -> int:
    """Bytes the model's weights occupy as held: each tensor's storage, plus the nf4 quantisation state (absmax and
    its double-quantised statistics) bitsandbytes keeps beside the packed 4-bit weights."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
            if qs.state2 is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
                total += qs.state2.code.numel() * qs.state2.code.element_size()
    return total
