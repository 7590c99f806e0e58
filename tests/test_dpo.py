"""semivlm/dpo.py: the DPO loss against its formula, reference log-probs (precomputed in dataset order across ranks,
or the PEFT model with adapters off), and a short run of the shared loop that raises the held-out reward margin."""
from __future__ import annotations

import copy
import json
import math
import random
import threading
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY_LLAMA, fp32_sum_tol, reset_accelerate

from semivlm.data import RecordError
from semivlm.dpo import (REFERENCE_CACHE, collate_pairs, dpo_loss, encode_pair, make_dpo_loss, pair_logps,
                         precompute_reference_logps, preference_metrics, reference_on_start, sequence_logps)

MATERIALS = ["oxide", "nitride", "resist", "copper", "tungsten", "polysilicon", "cobalt", "hafnia"]


def make_pairs(n: int, seed: int) -> list[dict]:
    """Thickness questions: chosen answers in nm, rejected the same answer with the unit corrupted to µm
    (as data_prep/make_instructions.py corrupts a fact)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        m, t, w = rng.choice(MATERIALS), rng.randint(2, 300), rng.randint(1, 25)
        answer = f"The {m} film on wafer {w} is {t} nm thick."
        pairs.append({"id": f"s{seed}-{i:03d}", "images": [], "prompt": f"How thick is the {m} film on wafer {w}?",
                      "chosen": answer, "rejected": answer.replace(" nm ", " µm "),
                      "meta": {"corruption": "unit", "kind": "calculation"}})
    return pairs


@pytest.fixture(scope="module")
def tokenizer():
    from data_prep.build_corpus import train_tokenizer

    texts = [f"{p['prompt']} {p['chosen']} {p['rejected']}" for p in make_pairs(300, 99)]
    return train_tokenizer(texts, vocab_size=400)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=vocab_size, **spec))


def direct_logp(model, ids: list[int], labels: list[int]) -> float:
    """Summed log-prob of one unpadded sequence's labels, token by token in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != -100)


# ---------------------------------------------------------------- the formula

def test_dpo_loss_on_fixed_pairs_equals_the_formula_computed_by_hand():
    pc, pr = [-10.0, -4.0, -7.5, -20.0], [-12.0, -3.0, -7.5, -5.0]
    rc, rr = [-11.0, -4.5, -8.0, -19.0], [-11.5, -2.0, -6.0, -6.0]
    for beta in (0.1, 0.5, 2.0):
        losses, chosen, rejected = dpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)), beta)
        for i in range(4):
            z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
            assert float(losses[i]) == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-12)
            assert float(chosen[i]) == pytest.approx(beta * (pc[i] - rc[i]))
            assert float(rejected[i]) == pytest.approx(beta * (pr[i] - rr[i]))
    # a policy equal to its reference is indifferent: log 2 per pair
    same = torch.tensor(pc)
    assert dpo_loss(same, same - 3, same, same - 3, 0.1)[0].tolist() == pytest.approx([math.log(2)] * 4)


def test_sequence_logps_sums_shifted_label_logprobs_ignoring_minus_100():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    labels = torch.tensor([[-100, 3, 1, -100, -100], [-100, -100, 6, 0, 2], [5, 5, 5, 5, 5]])
    got = sequence_logps(logits, labels)
    assert got.dtype == torch.float32
    for b in range(3):
        want = 0.0
        for t in range(1, 5):
            if labels[b, t] != -100:  # logits at t-1 predict the label at t
                row = [float(x) for x in logits[b, t - 1]]
                want += row[labels[b, t]] - math.log(sum(math.exp(x) for x in row))
        # fp32 against float64: up to 4 positions, each a logsumexp of 7 logits minus the label's logit
        tol = fp32_sum_tol(4 * (7 + 1), 4 * (2 * float(logits.float().abs().max()) + math.log(7)))
        assert float(got[b]) == pytest.approx(want, abs=tol)
    # the summed log-prob is differentiable and its gradient reaches only supervised positions
    leaf = logits.float().requires_grad_()
    sequence_logps(leaf, labels).sum().backward()
    reached = leaf.grad.abs().sum(-1) > 0  # position t-1 for every supervised label at t
    assert reached.tolist() == [[True, True, False, False, False], [False, True, True, True, False],
                                [True, True, True, True, False]]


# ---------------------------------------------------------------- records and batches

@pytest.mark.parametrize("change, message", [
    ({"rejected": "The oxide film on wafer 3 is 40 nm thick."}, "same text"),
    ({"chosen": ""}, "'chosen' is empty"),
    ({"chosen": None}, "'chosen' is missing"),
    ({"prompt": None}, "'prompt' is missing"),
    ({"images": ["a.png"]}, "image"),
])
def test_bad_preference_pair_is_a_record_error_naming_the_pair(change, message):
    record = {"id": "doc07-c003-i1.pref", "images": [], "prompt": "How thick is the oxide film on wafer 3?",
              "chosen": "The oxide film on wafer 3 is 40 nm thick.",
              "rejected": "The oxide film on wafer 3 is 40 µm thick.", "meta": {}}
    record.update(change)
    record = {k: v for k, v in record.items() if v is not None}
    with pytest.raises(RecordError, match=rf"prefs\.jsonl:4: preference pair 'doc07-c003-i1\.pref'.*{message}"):
        encode_pair(None, record, 128, where="prefs.jsonl:4")


def test_encode_pair_shares_the_prompt_and_supervises_only_each_reply(tokenizer):
    pair = make_pairs(1, 5)[0]
    enc = encode_pair(tokenizer, pair, 256)
    assert enc["id"] == pair["id"]
    for side in ("chosen", "rejected"):
        ids, labels = enc[f"{side}_input_ids"], enc[f"{side}_labels"]
        assert len(ids) == len(labels)
        supervised = [t for t, l in zip(ids, labels) if l != -100]
        assert supervised == [l for l in labels if l != -100]
        assert pair[side] in tokenizer.decode(supervised) and pair["prompt"] not in tokenizer.decode(supervised)
    first = next(i for i, l in enumerate(enc["chosen_labels"]) if l != -100)
    assert enc["chosen_input_ids"][:first] == enc["rejected_input_ids"][:first]  # the same prompt tokens

    # cut before the replies differ: nothing to prefer, said with the pair's name; too long with overflow="skip":
    # chat.SkipRecord unchanged, for the caller to count
    differ = next(i for i, (c, r) in enumerate(zip(enc["chosen_input_ids"], enc["rejected_input_ids"])) if c != r)
    with pytest.raises(RecordError, match=rf"prefs\.jsonl: preference pair '{pair['id']}'.*encode identically"):
        encode_pair(tokenizer, pair, differ, where="prefs.jsonl")
    from semivlm.chat import SkipRecord

    with pytest.raises(SkipRecord):
        encode_pair(tokenizer, pair, differ, where="prefs.jsonl", overflow="skip")


def test_collate_puts_chosen_first_rejected_last_counts_pairs_and_carries_references():
    rows = [{"id": "a", "chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
             "rejected_input_ids": [1, 2], "rejected_labels": [-100, 4], "ref_chosen_logp": -1.5,
             "ref_rejected_logp": -2.5},
            {"id": "b", "chosen_input_ids": [5, 6, 7, 8], "chosen_labels": [-100, -100, 7, 8],
             "rejected_input_ids": [5], "rejected_labels": [-100], "ref_chosen_logp": -3.0, "ref_rejected_logp": -4.0}]
    batch = collate_pairs(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 7, 8], [1, 2, 0, 0], [5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [-100, -100, 7, 8], [-100, 4, -100, -100],
                                        [-100, -100, -100, -100]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 4, 2, 1]
    assert batch["_n_items"] == 2 and batch["_n_tokens"] == 10
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -3.0] and batch["ref_rejected_logps"].tolist() == [-2.5, -4.0]
    assert "ref_chosen_logps" not in collate_pairs([{k: v for k, v in r.items() if not k.startswith("ref")}
                                                    for r in rows], pad_id=0)


# ---------------------------------------------------------------- references

def test_precomputed_reference_logps_follow_dataset_order_and_equal_a_direct_per_row_computation(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    rows = [encode_pair(tokenizer, p, 256) for p in make_pairs(5, 11)]
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    want = [(direct_logp(model, r["chosen_input_ids"], r["chosen_labels"]),
             direct_logp(model, r["rejected_input_ids"], r["rejected_labels"])) for r in rows]
    model.train()
    got = precompute_reference_logps(model, rows, collate, micro_batch_size=2)
    assert model.training  # eval mode only for the pass
    # padded micro-batches of 2 in fp32 against one unpadded row in float64: a sum over ≤ 256 label positions, each
    # a log-softmax over the vocabulary
    tol = max(fp32_sum_tol(256 + len(tokenizer), abs(v)) for pair in want for v in pair)
    assert [v for pair in got for v in pair] == pytest.approx([v for pair in want for v in pair], abs=tol)

    # two ranks: 5 rows in micro-batches of 2 -> each rank runs 2 forwards (rank 1's second one is a repeated row
    # of weight 0) and both get every row back, in order
    results, forwards, barrier, shared = {}, {0: 0, 1: 0}, threading.Barrier(2), {}

    def rank(k):
        def gather(t):
            shared[k] = t
            barrier.wait()
            return torch.cat([shared[0], shared[1]])

        def counting_collate(batch_rows):
            forwards[k] += 1
            return collate(batch_rows)

        acc = SimpleNamespace(num_processes=2, process_index=k, device=torch.device("cpu"), gather=gather)
        results[k] = precompute_reference_logps(model, rows, counting_collate, 2, acc)

    threads = [threading.Thread(target=rank, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert forwards == {0: 2, 1: 2}
    assert results[0] == got and results[1] == got


def test_adapter_off_reference_is_the_base_model_so_fresh_lora_gives_log_2_per_pair(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(len(tokenizer), seed=4)
    frozen_base = copy.deepcopy(base).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    model.train()
    rows = [encode_pair(tokenizer, p, 256) for p in make_pairs(3, 12)]
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    loss_fn = make_dpo_loss(beta=0.1, reference="adapter_off")
    loss, extras = loss_fn(model, batch, 3.0)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    assert extras["rewards_margin"] == pytest.approx(0, abs=1e-6) and extras["reward_accuracy"] == 0.0

    # with trained adapters (non-zero B) the reference is still the base model, also through a DDP/engine-style
    # wrapper that holds the PEFT model in .module; gradients reach the adapters only
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            return self.module(**kw)

    model.eval()  # no LoRA dropout, so the independent computation below sees the same policy
    loss, extras = loss_fn(Wrapper(model), batch, 3.0)
    loss.backward()
    loss = loss.detach()
    want = []
    for r in rows:
        pc = direct_logp(model, r["chosen_input_ids"], r["chosen_labels"])
        pr = direct_logp(model, r["rejected_input_ids"], r["rejected_labels"])
        rc = direct_logp(frozen_base, r["chosen_input_ids"], r["chosen_labels"])
        rr = direct_logp(frozen_base, r["rejected_input_ids"], r["rejected_labels"])
        want.append(-math.log(1 / (1 + math.exp(-0.1 * ((pc - rc) - (pr - rr))))))
    assert float(loss) == pytest.approx(sum(want) / 3, abs=1e-4) and abs(float(loss) - math.log(2)) > 1e-3
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_reference_logps_are_cached_and_a_resumed_run_reads_them_instead_of_using_its_trained_weights(
        tokenizer, tmp_path):
    rows = [encode_pair(tokenizer, p, 256) for p in make_pairs(3, 13)]
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), is_main_process=True,
                          print=lambda *a: None, wait_for_everyone=lambda: None)
    start = tiny_llama(len(tokenizer), seed=5)
    reference_on_start([rows[:2], rows[2:]], collate, 2, tmp_path)(start, acc)
    first = [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in rows]
    assert first == precompute_reference_logps(start, rows, collate, 3)
    assert json.loads((tmp_path / REFERENCE_CACHE).read_text())["ids"] == [r["id"] for r in rows]

    # resumed from a checkpoint, with other weights by now: the cached reference, not the current model
    (tmp_path / "checkpoints/step_0000002").mkdir(parents=True)
    (tmp_path / "checkpoints/step_0000002/trainer_state.json").write_text("{}")
    trained = tiny_llama(len(tokenizer), seed=6)
    fresh = [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows]
    reference_on_start([fresh], collate, 2, tmp_path)(trained, acc)
    assert [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in fresh] == first

    # found by id: a resumed run that reads some of the cached pairs, in another order, gets their values ...
    some = [dict(r) for r in fresh[:0:-1]]
    reference_on_start([some], collate, 2, tmp_path)(trained, acc)
    assert [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in some] == first[:0:-1]
    # ... and one that reads a pair the cache never saw stops
    other = [dict(fresh[0], id=f"{fresh[0]['id']}-not-cached")]
    with pytest.raises(SystemExit, match="for other pairs.*resumes from a checkpoint"):
        reference_on_start([other], collate, 2, tmp_path)(trained, acc)
    (tmp_path / REFERENCE_CACHE).unlink()
    with pytest.raises(SystemExit, match="missing.*resumes from a checkpoint"):
        reference_on_start([fresh], collate, 2, tmp_path)(trained, acc)


# ---------------------------------------------------------------- training

def test_short_dpo_run_of_the_loop_raises_the_heldout_margin_of_chosen_over_rejected(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from semivlm.loop import TrainConfig, make_accelerator, train

    pairs = make_pairs(44, 21)
    train_rows = [encode_pair(tokenizer, p, 256) for p in pairs[:32]]
    heldout = [encode_pair(tokenizer, p, 256) for p in pairs[32:]]
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    beta = 0.1
    reset_accelerate()
    cfg = TrainConfig(output_dir=str(tmp_path / "dpo"), max_steps=30, micro_batch_size=4, learning_rate=1e-3,
                      warmup_steps=3, eval_every=0, eval_batches=4, save_every=0,
                      ds_config=str(REPO / "ds_configs/zero3_fp32.json"))
    accelerator = make_accelerator(cfg)
    model = tiny_llama(len(tokenizer), seed=7)
    initial = copy.deepcopy(model)
    result = train(cfg, accelerator, model, tokenizer, train_rows, heldout, collate,
                   loss_fn=make_dpo_loss(beta, "precomputed"), seq_len=64,
                   on_start=reference_on_start([train_rows, heldout], collate, cfg.micro_batch_size, cfg.output_dir))

    # the hook attached the starting model's log-probs as the reference: against them it has margin 0, loss log 2
    before = preference_metrics(initial, heldout, collate, 4, beta)
    assert before["rewards_margin"] == pytest.approx(0, abs=1e-4) and before["loss"] == pytest.approx(math.log(2))
    after = preference_metrics(AutoModelForCausalLM.from_pretrained(result["final_dir"]), heldout, collate, 4, beta)
    print(f"held-out before {before}\nheld-out after {after}")
    assert after["rewards_margin"] > 1.0, after
    assert after["reward_accuracy"] >= 0.9 > before["reward_accuracy"], after
    assert after["chosen_rewards"] > after["rejected_rewards"]

    history = result["history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 30 and {"rewards_margin", "reward_accuracy", "chosen_rewards"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # first step: policy == reference
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals[0] == pytest.approx(math.log(2), abs=1e-4) and evals[-1] == pytest.approx(after["loss"], abs=1e-3)
