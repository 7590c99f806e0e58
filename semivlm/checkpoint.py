"""Checkpoints that are complete or absent, resume discovery, and the final Hugging Face export.

A checkpoint is written into `checkpoints/.tmp-step_XXXXXXX/` by every rank, then renamed to `step_XXXXXXX/` by the
main process after a barrier. A rename within one directory is atomic, so a job killed mid-save leaves only a
`.tmp-` directory, which resume ignores and removes: the run restarts from the previous complete checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def final_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "final"


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint: a `step_N` directory holding a trainer state (temporaries never count)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    complete = [d for d in root.glob("step_*") if (d / TRAINER_STATE).is_file()]
    return max(complete, key=lambda d: int(d.name.split("_")[1]), default=None)


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete `.tmp-*` leftovers of a save that was interrupted; returns what was removed (main process only)."""
    root = checkpoint_root(output_dir)
    removed = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def save_checkpoint(accelerator, output_dir, step: int, trainer_state: dict, run_config: dict, keep: int,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Save model, optimizer, scheduler and RNG state of every rank; visible only once complete.
    `extra_files` ({name: text}, e.g. routing statistics) are written inside before it becomes visible."""
    root = checkpoint_root(output_dir)
    tmp, final = root / f".tmp-step_{step:07d}", root / f"step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, default=str) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        # written last: its presence is what marks the directory as a usable checkpoint
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        old = sorted((d for d in root.glob("step_*") if d != final), key=lambda d: int(d.name.split("_")[1]))
        for d in old[: max(0, len(old) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(d, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"checkpoint '{checkpoint}' is corrupt: cannot read {TRAINER_STATE} ({e})") from None


@contextlib.contextmanager
def unpartitioned():
    """Models built inside are whole, on this process alone, even while the run's ZeRO-3 config is active
    (otherwise construction would partition them and wait for the other ranks)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _plain_model(model_class, config=None, pretrained: str | None = None):
    """A full-precision model of `model_class` (causal LM or VLM) from a config, or from_pretrained without
    quantisation, on this process alone."""
    with unpartitioned():
        if pretrained:
            return model_class.from_pretrained(pretrained, dtype=torch.float32)
        return model_class._from_config(config)


def _run_keys(plain, state_dict: dict, wanted=lambda key: True) -> dict:
    """The run's weights under the export model's names, for the keys `wanted` selects (all must be there).
    Modules trained in full beside LoRA are `modules_to_save` in the export's LoraConfig only (PEFT would deep-copy
    them in training, which ZeRO-3's partitioned weights do not survive): their trained weights fill both the saved
    copy and the original."""
    out, missing = {}, []
    for key in filter(wanted, plain.state_dict()):
        source = key.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
        if source in state_dict:
            out[key] = state_dict[source]
        else:
            missing.append(key)
    if missing:
        raise RuntimeError(f"LoRA export: {len(missing)} weights missing from the run, e.g. {missing[:3]}")
    return out


def stop_at_end_of_turn(model_dir: Path, tokenizer) -> None:
    """Make generation_config.json stop at the chat template's end-of-turn token as well as eos, so plain
    `generate()` and vLLM end a chat answer where training taught the model to end it."""
    from transformers import GenerationConfig

    from semivlm.chat import end_of_turn_ids

    path = model_dir / "generation_config.json"
    if not path.is_file():
        return
    config = GenerationConfig.from_pretrained(model_dir)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else \
        [config.eos_token_id] if config.eos_token_id is not None else []
    stops = eos + [t for t in end_of_turn_ids(tokenizer) if t not in eos]
    if stops != eos:
        config.eos_token_id = stops
        config.save_pretrained(model_dir)


def export_final(accelerator, model, tokenizer, output_dir, run_config: dict, lora_config=None,
                 base_for_merge: str | None = None, extra_files: dict[str, str] | None = None,
                 layout: tuple | None = None) -> Path:
    """Gather the (possibly ZeRO-3-sharded) weights and write a plain `save_pretrained` directory, atomically.

    LoRA runs are exported merged, so the result loads with `AutoModelForCausalLM.from_pretrained` and serves
    without PEFT; the adapter itself is kept in `output_dir/adapter` (PEFT format, e.g. for vLLM's LoRA serving). QLoRA adapters were trained on a quantised base: `base_for_merge` names the unquantised base
    they are merged onto (only the adapter weights are taken from the run). `layout` = (to the run's module layout,
    back to the saved one), applied in place to the plain model before LoRA and after the merge, e.g. MoE experts
    unfused into per-expert Linears for LoRA with dropout or nf4 (moe.unfuse_experts, moe.fuse_experts).
    """
    to_run, to_saved = layout or (lambda m: m, lambda m: m)
    out, tmp = final_dir(output_dir), Path(output_dir) / ".tmp-final"
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every rank must call it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if lora_config is not None:
            from peft import get_peft_model

            if base_for_merge:
                base_class = type(unwrapped.get_base_model())
                plain = _plain_model(base_class, pretrained=base_for_merge)
                to_run(plain)
                plain = get_peft_model(plain, lora_config)
                # only the adapter (and modules trained in full) come from the run; the base is unquantised
                trained = lambda k: "lora_" in k or ".modules_to_save." in k  # noqa: E731
                plain.load_state_dict(_run_keys(plain, state_dict, trained), strict=False)
            else:
                base = unwrapped.get_base_model()
                plain = _plain_model(type(base), config=base.config)
                to_run(plain)
                plain = get_peft_model(plain, lora_config)
                plain.load_state_dict(_run_keys(plain, state_dict))  # strict: no half-trained export
            adapter, adapter_tmp = Path(output_dir) / "adapter", Path(output_dir) / ".tmp-adapter"
            shutil.rmtree(adapter_tmp, ignore_errors=True)
            plain.save_pretrained(adapter_tmp)
            shutil.rmtree(adapter, ignore_errors=True)
            adapter_tmp.rename(adapter)
            merged = plain.merge_and_unload()
            to_saved(merged)
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            stop_at_end_of_turn(tmp, getattr(tokenizer, "tokenizer", tokenizer))
        (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, default=str) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    accelerator.wait_for_everyone()
    return out


# ---------------------------------------------------------------- resume on another world size or format
#
# A checkpoint is written in the format of the run that saved it: under DeepSpeed, `pytorch_model/` holds one
# optimizer (and, under ZeRO-3, weight) partition per rank; without it, `model.safetensors` + `optimizer.bin` are
# whole. Loading is direct when the format is the same and, for DeepSpeed, the world size too (plain checkpoints do
# not depend on it). Otherwise the DeepSpeed checkpoint is converted once, on the main process, into DeepSpeed's
# universal format (`universal/`: per parameter name, the fp32 master weight and both Adam moments), which any
# partitioning loads: DeepSpeed itself with `load_universal`, a plain run by name into torch's AdamW.

UNIVERSAL = "universal"
MODEL_TAG = "pytorch_model"  # accelerate's tag (its MODEL_NAME) for the DeepSpeed engine's checkpoint


def is_deepspeed_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / MODEL_TAG).is_dir()


def saved_world_size(checkpoint: Path, state: dict) -> int:
    """The number of ranks that wrote `checkpoint` (trainer state; older checkpoints: their per-rank RNG files)."""
    return int(state.get("world_size") or len(list(checkpoint.glob("random_states_*.pkl"))) or 1)


def tied_parameter_names(model) -> list[list[str]]:
    """Names that share one parameter (tied embeddings: [model.embed_tokens.weight, lm_head.weight]), first the one
    named_parameters() keeps."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def universal_checkpoint(checkpoint: Path, log=print, ties: list[list[str]] = ()) -> Path:
    """`checkpoint/universal/`, converted from the DeepSpeed partitions on first use (main process only; atomic,
    so an interrupted conversion is redone). DeepSpeed 0.19.8's ZeRO-3 conversion writes a tied parameter under each
    of its names but only the first holds its values (measured: lm_head.weight differs from model.embed_tokens.weight
    by 0.13 on a tiny tied Llama), and which one its loader reads is not documented: every alias gets the first
    name's files. ZeRO-1/2 checkpoints lack the `universal_checkpoint_info` that Megatron-style clients write (its
    tensor- and pipeline-parallel slicing; none here): `inject_missing_state` supplies the bare version it needs."""
    import argparse
    import contextlib
    import io

    out = checkpoint / UNIVERSAL
    if (out / "latest_universal").is_file():
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = checkpoint / f".tmp-{UNIVERSAL}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    args = argparse.Namespace(input_folder=str(checkpoint / MODEL_TAG), output_folder=str(tmp / MODEL_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bars and argument dump
        ds_to_universal(args)
    zero = tmp / MODEL_TAG / "zero"
    for first, *aliases in ties:
        for alias in aliases:
            if (zero / first).is_dir():
                shutil.rmtree(zero / alias, ignore_errors=True)
                shutil.copytree(zero / first, zero / alias)
    # the scheduler and RNG states sit beside the engine's tag, where accelerate.load_state looks for them
    for f in list(checkpoint.glob("custom_checkpoint_*.pkl")) + list(checkpoint.glob("random_states_*.pkl")):
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    log(f"converted {checkpoint} to DeepSpeed's universal format in {out}")
    return out


def _optimizer_hyperparameters(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _restore_hyperparameters(optimizer, saved: list[dict], lrs: list[float]) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load. It copies the first saved group's hyperparameters
    into every group (weight decay 0.0 onto the decayed matrices, or 0.1 onto norms): the run's own, with the
    scheduler's lr, go back. And it gives every group's state one shared `step` tensor, which torch's AdamW then
    increments once per group and step (the second group's bias correction runs ahead): each gets its own copy."""
    for group, hyper, lr in zip(optimizer.param_groups, saved, lrs):
        group.update(hyper)
        group["lr"] = lr
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _load_scheduler(optimizer, scheduler, checkpoint: Path) -> None:
    """The scheduler as saved (accelerate's first custom object), and the optimizer's lr from it."""
    scheduler.load_state_dict(torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False))
    for group, lr in zip(getattr(optimizer, "optimizer", optimizer).param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def _load_universal_into_plain(accelerator, model, optimizer, scheduler, universal: Path, checkpoint: Path) -> None:
    """Weights and Adam moments by parameter name from a universal checkpoint into an unpartitioned model and torch
    AdamW; then the scheduler (the RNG of the old ranks does not apply to this run's)."""
    zero = universal / MODEL_TAG / "zero"
    common = torch.load(zero / "optimizer_state.pt", weights_only=False)
    if "optimizer_state_dict" in common:  # ZeRO-3: the step sits in the common optimizer state
        step = float(next(iter(common["optimizer_state_dict"]["state"].values()))["step"])
    else:  # ZeRO-1/2: one step.pt per parameter, all equal
        step = float(torch.load(next(zero.glob("*/step.pt")), weights_only=False))
    unwrapped = accelerator.unwrap_model(model)
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    missing = []
    for name, param in unwrapped.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights are not the optimizer's: they come from init_from, as in the saved run
        folder = zero / name
        if not (folder / "fp32.pt").is_file():
            missing.append(name)
            continue
        def load(key, folder=folder, shape=param.shape):
            value = torch.load(folder / f"{key}.pt", weights_only=False)
            # ZeRO-1/2 conversions wrap each tensor as {"param": tensor, "cat_dim": …}; ZeRO-3's are bare
            return (value["param"] if isinstance(value, dict) else value).reshape(shape)
        with torch.no_grad():
            param.copy_(load("fp32").to(param.dtype))
        torch_optimizer.state[param] = {"step": torch.tensor(step), "exp_avg": load("exp_avg").to(param.device),
                                        "exp_avg_sq": load("exp_avg_sq").to(param.device)}
    if missing:
        raise SystemExit(f"checkpoint '{checkpoint}' holds no trained weights for {len(missing)} parameters of this "
                         f"model, e.g. {missing[:2]}: was it written by another model or LoRA setting?")
    _load_scheduler(optimizer, scheduler, checkpoint)


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of `checkpoint`, by parameter name, whatever wrote it: a plain run's
    model.safetensors (or pytorch_model.bin), or DeepSpeed's partitions of any ZeRO stage and world size
    (zero_to_fp32 reads the fp32 master copies in the optimizer files, which it needs no conversion for)."""
    if is_deepspeed_checkpoint(checkpoint):
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its per-file progress lines
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=MODEL_TAG)
    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(checkpoint / "model.safetensors")
    if (checkpoint / "pytorch_model.bin").is_file():
        return torch.load(checkpoint / "pytorch_model.bin", weights_only=True, map_location="cpu")
    raise SystemExit(f"checkpoint '{checkpoint}' is corrupt: no model.safetensors, pytorch_model.bin or "
                     f"{MODEL_TAG}/ in it")


def _load_weights_restart_optimizer(accelerator, model, optimizer, scheduler, checkpoint: Path) -> None:
    """The checkpoint's weights into this run's model, whatever its partitioning, and its schedule; the optimizer
    keeps the fresh state prepare() gave it. Under ZeRO-3 each parameter is gathered, set by the main process and
    re-partitioned (every rank joins, in the same order); then the optimizer's fp32 master copies, which ZeRO keeps
    apart from the module's weights and steps from, are refreshed from them."""
    weights = checkpoint_weights(checkpoint)
    unwrapped = accelerator.unwrap_model(model)
    ties = {name: names for names in tied_parameter_names(unwrapped) for name in names}
    missing = []
    for name, param in unwrapped.named_parameters():
        # a tied weight may be saved under another of its names (safetensors keeps one)
        value = next((weights[n] for n in ties.get(name, [name]) if n in weights), None)
        if value is None:
            if param.requires_grad:
                missing.append(name)
            continue  # frozen weights come from init_from, as in the saved run
        if hasattr(param, "ds_id"):  # partitioned by ZeRO-3: every rank takes part in the gather
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if accelerator.is_main_process:
                    with torch.no_grad():
                        param.copy_(value.reshape(param.shape).to(param.dtype))
        else:
            with torch.no_grad():
                param.copy_(value.reshape(param.shape).to(param.dtype))
    if missing:
        raise SystemExit(f"checkpoint '{checkpoint}' holds no weights for {len(missing)} trained parameters of this "
                         f"model, e.g. {missing[:2]}: was it written by another model or LoRA setting?")
    refresh = getattr(getattr(model, "optimizer", None), "refresh_fp32_params", None)  # DeepSpeed's ZeRO optimizer
    if refresh is not None:
        refresh()
    _load_scheduler(optimizer, scheduler, checkpoint)


def _convert_on_main(accelerator, model, checkpoint: Path, log) -> str | None:
    """Convert `checkpoint` to the universal format on the main process; the error's first line, on every rank, if
    DeepSpeed cannot (e.g. a ZeRO stage or optimizer layout its converter does not handle)."""
    error = None
    if accelerator.is_main_process:
        try:
            universal_checkpoint(checkpoint, log, tied_parameter_names(accelerator.unwrap_model(model)))
        except Exception as e:  # noqa: BLE001 - any failure of the converter falls back to the weights alone
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error], from_process=0)[0]
    accelerator.wait_for_everyone()
    return error


def load_checkpoint(accelerator, model, optimizer, scheduler, checkpoint: Path, state: dict, log=print) -> None:
    """Resume model, optimizer, scheduler (and RNG where it applies) from `checkpoint`, whatever the world size and
    whether it or this run uses DeepSpeed. The weights always cross; the Adam moments cross wherever DeepSpeed's
    universal checkpoint carries them, and otherwise the optimizer restarts with one line saying why:
    * same format (and, under DeepSpeed, same world size): accelerate loads everything;
    * DeepSpeed -> another world size or a plain run: through the universal checkpoint; if DeepSpeed cannot convert
      it, the fp32 weights (zero_to_fp32) and the schedule, with a fresh optimizer;
    * plain -> DeepSpeed: the weights and the schedule, with a fresh optimizer (torch's whole Adam state has no
      route into DeepSpeed's partitions that DeepSpeed supports)."""
    world = accelerator.num_processes
    saved_world = saved_world_size(checkpoint, state)
    saved_ds = is_deepspeed_checkpoint(checkpoint)
    now_ds = getattr(accelerator.state, "deepspeed_plugin", None) is not None
    if saved_ds == now_ds and (not now_ds or saved_world == world):
        accelerator.load_state(str(checkpoint))
        return
    what = (f"{saved_world} {'DeepSpeed' if saved_ds else 'plain'} rank(s) -> {world} "
            f"{'DeepSpeed' if now_ds else 'plain'} rank(s)")
    if not saved_ds:
        _load_weights_restart_optimizer(accelerator, model, optimizer, scheduler, checkpoint)
        log(f"resumed across formats ({what}): weights and schedule from {checkpoint}; the optimizer restarts (a "
            "plain run's Adam state cannot be loaded into DeepSpeed's partitions)")
        return
    error = _convert_on_main(accelerator, model, checkpoint, log)
    if error is not None:
        _load_weights_restart_optimizer(accelerator, model, optimizer, scheduler, checkpoint)
        log(f"resumed across world sizes ({what}) without the Adam state: DeepSpeed could not convert {checkpoint} "
            f"to its universal format ({error}); weights and schedule from it, the optimizer restarts")
        return
    universal = checkpoint / UNIVERSAL
    if not now_ds:
        _load_universal_into_plain(accelerator, model, optimizer, scheduler, universal, checkpoint)
    else:
        engine = model  # accelerate returns the DeepSpeed engine from prepare()
        hyper = _optimizer_hyperparameters(scheduler.optimizer)
        engine._config.load_universal_checkpoint = True
        try:
            accelerator.load_state(str(universal))
        finally:
            engine._config.load_universal_checkpoint = False
        _restore_hyperparameters(scheduler.optimizer, hyper, scheduler.get_last_lr())
    log(f"resumed across world sizes ({what}): weights, Adam moments and schedule from {universal}")
