"""Direct Preference Optimization (Rafailov et al., 2023) as one more objective of the one training loop.

Why plain functions and not TRL's DPOTrainer: the loop already owns accumulation, ZeRO-3, resume, logging and
export, and DPO only changes what a micro-batch holds and how its loss is computed. So DPO here is
  * `encode_pair`      a preference record {"id", "images", "prompt", "chosen", "rejected", "meta"} -> two chat
                       encodings (semivlm.chat.encode_chat: the same template and label masking as SFT);
  * `collate_pairs`    B pairs -> one batch of 2B sequences (chosen rows first, rejected rows last), so policy
                       log-probs take ONE forward (ZeRO-3 gathers every layer once per forward, not twice), with
                       `_n_items` = B: the loop normalises by pairs, not tokens (sum of pair losses / pairs in step);
  * `make_dpo_loss`    the loop's loss_fn: sigmoid DPO loss, reference log-probs either precomputed (frozen copy of
                       the starting model, computed once: no second model in memory) or taken on the fly from the same
                       PEFT model with its adapters disabled (LoRA: the base model *is* the reference);
  * `precompute_reference_logps` / `reference_on_start`   the reference pass (every rank, same number of forwards),
                       cached in output_dir so a resumed run does not mistake its trained weights for the reference;
  * `pairs_read`       the pairs a run reads (a max_steps run's sample, the evaluated held-out pairs): the only
                       ones the reference pass needs;
  * `preference_metrics`   held-out reward margin / accuracy against the reference.

Sequence log-probs are sums over the reply tokens (labels != -100), computed in fp32 from only the supervised
positions, so a bf16 run does not round away the small differences DPO learns from.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from semivlm.data import RecordError

REFERENCE_CACHE = "dpo_reference_logps.json"


# ---------------------------------------------------------------- the objective

def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: -log σ(β[(π_c − r_c) − (π_r − r_r)]); rewards β(π − r) (detached, for logging)."""
    ref_chosen_logps = ref_chosen_logps.to(policy_chosen_logps)
    ref_rejected_logps = ref_rejected_logps.to(policy_rejected_logps)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the label tokens per sequence: logits[:, t] predicts labels[:, t + 1]; -100 is
    ignored. fp32, and only at supervised positions (a [B, T, V] fp32 copy would dwarf the activations)."""
    labels = labels[:, 1:].to(logits.device)
    mask = labels != -100
    rows = mask.nonzero(as_tuple=True)[0]
    picked = logits[:, :-1][mask].float()  # [N_supervised, V]
    token_logps = picked.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, token_logps)


# ---------------------------------------------------------------- records and batches

def encode_pair(tokenizer, record: dict, max_length: int, where: str = "", overflow: str = "truncate") -> dict:
    """A preference record -> {"id", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}.

    The prompt is one user message (string content), each reply the assistant message after it. Bad records raise
    RecordError naming `where` and the pair id; encode_chat's RecordErrors get `where` prepended, SkipRecord (e.g.
    overflow="skip" and too long) passes through unchanged.
    """
    rid = record.get("id") if isinstance(record, dict) else None
    name = f"{where + ': ' if where else ''}preference pair {rid!r}"
    if not isinstance(record, dict) or not isinstance(rid, str) or not rid:
        raise RecordError(f"{name}: a preference record needs a non-empty string 'id'")
    for key in ("prompt", "chosen", "rejected"):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"{name}: '{key}' is {'missing' if value is None else 'empty or not a string'}")
    if record.get("images"):
        raise RecordError(f"{name}: has {len(record['images'])} image(s); text DPO cannot see them "
                          "(filter image pairs out, or train them with the VLM)")
    if record["chosen"].strip() == record["rejected"].strip():
        raise RecordError(f"{name}: 'chosen' and 'rejected' are the same text: nothing to prefer")
    from semivlm.chat import encode_chat

    out = {"id": rid}
    for side in ("chosen", "rejected"):
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record[side]}]
        try:
            enc = encode_chat(tokenizer, messages, max_length, f"{rid} ({side})", overflow)
        except RecordError as e:
            if not where or type(e) is not RecordError:  # SkipRecord passes through as it is, to be counted
                raise
            err = RecordError(f"{where}: {e}")
            err.reason = getattr(e, "reason", "invalid")
            raise err from None
        out[f"{side}_input_ids"], out[f"{side}_labels"] = list(enc["input_ids"]), list(enc["labels"])
    if out["chosen_input_ids"] == out["rejected_input_ids"]:
        raise RecordError(f"{name}: chosen and rejected encode identically within max_length={max_length} "
                          "(they differ only after the cut): nothing to prefer")
    return out


def collate_pairs(rows: list[dict], pad_id: int) -> dict:
    """B encoded pairs -> 2B right-padded sequences: rows [0, B) chosen, [B, 2B) rejected.

    Adds `ref_chosen_logps` / `ref_rejected_logps` [B] when the rows carry "ref_chosen_logp"/"ref_rejected_logp",
    `_n_items` = B (the loop normalises DPO per pair) and `_n_tokens` (non-padding tokens, for tokens/s).
    """
    seqs = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows] + \
           [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "_n_items": len(rows), "_n_tokens": int(attention_mask.sum())}
    has_ref = ["ref_chosen_logp" in r and "ref_rejected_logp" in r for r in rows]
    if all(has_ref):
        batch["ref_chosen_logps"] = torch.tensor([float(r["ref_chosen_logp"]) for r in rows], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([float(r["ref_rejected_logp"]) for r in rows], dtype=torch.float32)
    elif any(has_ref):
        raise ValueError("collate_pairs: some rows carry reference log-probs and some do not "
                         f"(missing for {[r.get('id') for r, h in zip(rows, has_ref) if not h][:5]})")
    return batch


# ---------------------------------------------------------------- the loop's loss_fn

def _forward_logps(model, batch: dict) -> torch.Tensor:
    # image pairs (train_moe.py) carry pixel_values for their 2B rows; text pairs do not
    extra = {"pixel_values": batch["pixel_values"]} if batch.get("pixel_values") is not None else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **extra).logits
    return sequence_logps(logits, batch["labels"])


def _adapters_disabled(model):
    """PEFT's disable_adapter() context, also through a DeepSpeed engine or DDP (they hold the model in .module)."""
    for m in (model, getattr(model, "module", None)):
        if m is not None and hasattr(m, "disable_adapter"):
            return m.disable_adapter()
    raise ValueError("reference='adapter_off' needs a PEFT (LoRA) model; this model has no disable_adapter(). "
                     "Use reference='precomputed' for full fine-tuning.")


def make_dpo_loss(beta: float, reference: str = "precomputed") -> Callable:
    """loss_fn(model, batch, num_items) -> (sum of pair losses / num_items, extras) for semivlm.loop.train.

    reference="precomputed": the batch carries ref_chosen_logps / ref_rejected_logps (precompute_reference_logps);
    reference="adapter_off": the reference is the same PEFT model with its adapters disabled, run under no_grad.
    """
    if reference not in ("precomputed", "adapter_off"):
        raise ValueError(f"DPO reference must be 'precomputed' or 'adapter_off', not {reference!r}")
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, not {beta}")

    def loss_fn(model, batch: dict, num_items: float):
        n = batch["input_ids"].shape[0] // 2
        logps = _forward_logps(model, batch)
        if reference == "precomputed":
            if "ref_chosen_logps" not in batch:
                raise KeyError("DPO with reference='precomputed' needs rows with ref_chosen_logp/ref_rejected_logp "
                               "(run precompute_reference_logps / reference_on_start before training)")
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            with torch.no_grad(), _adapters_disabled(model):
                ref = _forward_logps(model, batch)
            ref_c, ref_r = ref[:n], ref[n:]
        losses, chosen_rewards, rejected_rewards = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, beta)
        extras = {"rewards_margin": float((chosen_rewards - rejected_rewards).mean()),
                  "reward_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
                  "chosen_rewards": float(chosen_rewards.mean()), "rejected_rewards": float(rejected_rewards.mean())}
        return losses.sum() / num_items, extras

    return loss_fn


# ---------------------------------------------------------------- reference pass and held-out metrics

@torch.no_grad()
def pair_logps(model, rows: list[dict], collate: Callable, micro_batch_size: int,
               accelerator=None) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probs of every row, in row order, in eval mode without gradients.

    With several ranks each takes every world-th micro-batch and the results are gathered; every rank runs the
    same number of forwards (ZeRO-3 gathers weights collectively), a rank short of rows repeats row 0 and drops it.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    n, micro = len(rows), micro_batch_size
    rounds = math.ceil(n / (micro * world))
    local = torch.full((rounds * micro, 3), -1.0, dtype=torch.float64, device=device)  # (row index, chosen, rejected)
    was_training = model.training
    model.eval()
    try:
        for r in range(rounds):
            idx = [i for i in range((r * world + rank) * micro, (r * world + rank + 1) * micro) if i < n]
            batch = collate([rows[i] for i in (idx or [0])])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logps = _forward_logps(model, batch).double()
            b = len(idx)
            if b:
                local[r * micro: r * micro + b, 0] = torch.tensor(idx, dtype=torch.float64, device=device)
                local[r * micro: r * micro + b, 1] = logps[:b]
                local[r * micro: r * micro + b, 2] = logps[len(logps) // 2: len(logps) // 2 + b]
    finally:
        model.train(was_training)
    gathered = accelerator.gather(local) if world > 1 else local
    out: list = [None] * n
    for i, c, rj in gathered.cpu().tolist():
        if i >= 0:
            out[int(i)] = (c, rj)
    assert all(v is not None for v in out), "reference pass missed rows"
    return out


def precompute_reference_logps(model, dataset_rows: list[dict], collate: Callable, micro_batch_size: int,
                               accelerator=None) -> list[tuple[float, float]]:
    """Reference (chosen, rejected) log-probs per row in dataset order: the model as it is now, i.e. at the start
    of DPO (the SFT model), frozen. Call on every rank; every rank gets all values."""
    return pair_logps(model, dataset_rows, collate, micro_batch_size, accelerator)


def attach_reference(rows, refs: list[tuple[float, float]]) -> None:
    """Store the reference log-probs in the rows (in place) as collate_pairs expects them; a dataset whose items
    are made on access (semivlm.record_index.IndexedRecords) gets them as columns its items then carry."""
    if len(rows) != len(refs):
        raise ValueError(f"{len(refs)} reference log-probs for {len(rows)} rows")
    if hasattr(rows, "add_columns"):
        rows.add_columns({"ref_chosen_logp": [float(c) for c, _ in refs],
                          "ref_rejected_logp": [float(r) for _, r in refs]})
        return
    for row, (c, r) in zip(rows, refs):
        row["ref_chosen_logp"], row["ref_rejected_logp"] = float(c), float(r)


class _Chained:
    """Several datasets read as one sequence, without copying their items."""

    def __init__(self, parts):
        self.parts = [p for p in parts if len(p)]

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i: int):
        for p in self.parts:
            if i < len(p):
                return p[i]
            i -= len(p)
        raise IndexError(i)


def _ids(ds) -> list[str]:
    return [str(x) for x in ds.column("id")] if hasattr(ds, "column") else [row["id"] for row in ds]


def reference_on_start(datasets: list[list[dict]], collate: Callable, micro_batch_size: int,
                       output_dir: str | Path) -> Callable:
    """An `on_start(model, accelerator)` hook for semivlm.loop.train: reference log-probs for every row of every
    dataset (train, held-out), attached to the rows in place and cached in output_dir/dpo_reference_logps.json.

    A fresh run (no checkpoint in output_dir) computes them from the model it starts with and (re)writes the cache;
    a resumed run reads the cache, because its model is no longer the reference, and stops with an error when the
    cache is missing or was made for other pairs.
    """
    from semivlm.checkpoint import find_latest_checkpoint

    cache = Path(output_dir) / REFERENCE_CACHE

    def on_start(model, accelerator):
        rows = _Chained(datasets)  # lists of rows, or record indexes whose items are made per micro-batch
        ids = [i for ds in datasets for i in _ids(ds)]
        if find_latest_checkpoint(output_dir) is not None:
            stored = json.loads(cache.read_text()) if cache.is_file() else None
            by_id = dict(zip(stored["ids"], stored["logps"])) if stored is not None else {}
            if stored is None or not all(i in by_id for i in ids):  # by id: the same pairs, in any order
                raise SystemExit(f"{cache} is {'missing' if stored is None else 'for other pairs'} but this run "
                                 "resumes from a checkpoint, whose weights are no longer the DPO reference: restore "
                                 "the file or start in a fresh output_dir")
            refs = [tuple(by_id[i]) for i in ids]
            accelerator.print(f"DPO reference log-probs of {len(rows)} pairs read from {cache}")
        else:
            # each dataset on its own: a micro-batch never mixes training and held-out pairs (nor pads one by the
            # other), as no micro-batch of the run does
            refs = [ref for ds in datasets if len(ds)
                    for ref in precompute_reference_logps(model, ds, collate, micro_batch_size, accelerator)]
            if accelerator.is_main_process:
                tmp = cache.with_name(f".{cache.name}.tmp")
                tmp.write_text(json.dumps({"ids": ids, "logps": refs}) + "\n")
                tmp.replace(cache)
            accelerator.wait_for_everyone()
            accelerator.print(f"DPO reference log-probs of {len(rows)} pairs computed and cached in {cache}")
        start = 0
        for ds in datasets:
            attach_reference(ds, refs[start:start + len(ds)])
            start += len(ds)

    return on_start


def pairs_read(cfg, train_set, eval_set, accelerator):
    """(training pairs, held-out pairs) that a run of `cfg` (a semivlm.loop.TrainConfig) reads, so that the
    reference pass, one forward per pair before step 1, skips the others: by max_steps, a seeded sample of
    max_steps × global batch training pairs, kept in their order (the loop then reads each once, as it would draw
    that many from the whole set); the first eval_batches × micro-batch × ranks held-out pairs, all that evaluation
    reads. By epochs, or when the run reads every pair, the datasets as they are. Datasets are lists or record
    indexes (semivlm.record_index.IndexedRecords: a selection is their `repeated` with 0 or 1 per item)."""
    import numpy as np

    from semivlm.checkpoint import find_latest_checkpoint, load_trainer_state

    def take(ds, keep: np.ndarray):
        return ds.repeated(keep.astype(np.int64)) if hasattr(ds, "repeated") else [r for r, k in zip(ds, keep) if k]

    world = accelerator.num_processes
    if cfg.epochs <= 0 and cfg.max_steps > 0:
        latest = find_latest_checkpoint(cfg.output_dir)  # a resume keeps the checkpoint's global batch
        saved = load_trainer_state(latest).get("global_batch") if latest is not None else None
        needed = cfg.max_steps * int(saved or world * cfg.micro_batch_size * cfg.grad_accum)
        if needed < len(train_set):
            keep = np.zeros(len(train_set), dtype=bool)
            keep[np.random.default_rng(cfg.seed).choice(len(train_set), needed, replace=False)] = True
            accelerator.print(f"DPO: {cfg.max_steps} steps read {needed:,} of the {len(train_set):,} training pairs "
                              f"(a sample, seed {cfg.seed}): reference log-probs for those only")
            train_set = take(train_set, keep)
    evaluated = cfg.eval_batches * cfg.micro_batch_size * world
    if eval_set is not None and evaluated < len(eval_set):
        eval_set = take(eval_set, np.arange(len(eval_set)) < evaluated)
    return train_set, eval_set


def preference_metrics(model, rows: list[dict], collate: Callable, micro_batch_size: int, beta: float,
                       accelerator=None) -> dict:
    """Held-out DPO loss, mean reward margin β[(π_c−r_c)−(π_r−r_r)], reward accuracy (share of pairs with
    chosen reward > rejected) and mean rewards of the current model against the reference log-probs in `rows`."""
    if not all("ref_chosen_logp" in r for r in rows):
        raise KeyError("preference_metrics needs rows with reference log-probs (precompute_reference_logps)")
    policy = torch.tensor(pair_logps(model, rows, collate, micro_batch_size, accelerator), dtype=torch.float64)
    ref = torch.tensor([(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in rows], dtype=torch.float64)
    losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta)
    return {"loss": float(losses.mean()), "rewards_margin": float((chosen - rejected).mean()),
            "reward_accuracy": float((chosen > rejected).double().mean()),
            "chosen_rewards": float(chosen.mean()), "rejected_rewards": float(rejected.mean())}
