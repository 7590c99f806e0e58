"""semivlm/chat.py: assistant-only labels checked per record (two chat templates), packing that is exactly equivalent
to unpacked training, packing efficiency, length grouping, and loud errors on bad conversations."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from semivlm.chat import (SkipRecord, collate_chat, encode_chat, encode_records, length_grouped_permutation,
                          pack_examples, packing_efficiency)
from semivlm.data import RecordError

from conftest import corpus_text, fp32_sum_tol

U1, A1 = "What does CMP remove?", "The copper overburden above the trench."
U2, A2 = "And at which pressure?", "About 2 psi of down force on the wafer."
CONVERSATION = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": [{"type": "text", "text": U2}]},
                {"role": "assistant", "content": [{"type": "text", "text": A2}]}]


@pytest.fixture(scope="module")
def chatml_tok():
    """The debug tokenizer: build_corpus's byte-level BPE with its ChatML {% generation %} template."""
    from data_prep.build_corpus import train_tokenizer

    return train_tokenizer(corpus_text(), vocab_size=600)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_from_pieces(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered pieces in order, and the positions of the pieces marked as supervised."""
    ids, positions = [], []
    for text, supervised in pieces:
        piece = ids_of(tok, text)
        if supervised:
            positions += range(len(ids), len(ids) + len(piece))
        ids += piece
    return ids, positions


def labelled_runs(example: dict) -> list[list[int]]:
    runs, current = [], []
    for i, l in zip(example["input_ids"], example["labels"]):
        if l != -100:
            assert l == i
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# --------------------------------------------------------------------------------------------------- masking
def test_chatml_generation_template_labels_exactly_the_assistant_text_and_im_end(chatml_tok):
    tok = chatml_tok
    ex = encode_chat(tok, CONVERSATION, 512, "r1")
    ids, positions = expected_from_pieces(tok, [
        ("<|im_start|>user\n" + U1 + "<|im_end|>\n<|im_start|>assistant\n", False), (A1 + "<|im_end|>", True),
        ("\n<|im_start|>user\n" + U2 + "<|im_end|>\n<|im_start|>assistant\n", False), (A2 + "<|im_end|>", True),
        ("\n", False)])
    assert ex["input_ids"] == ids
    assert [t for t, l in enumerate(ex["labels"]) if l != -100] == positions
    assert [tok.decode(run) for run in labelled_runs(ex)] == [A1 + "<|im_end|>", A2 + "<|im_end|>"]


def test_llama3_template_without_generation_markers_labels_exactly_the_assistant_text_and_eot(llama3_tok):
    tok = llama3_tok
    ex = encode_chat(tok, CONVERSATION, 512, "r1")
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    ids, positions = expected_from_pieces(tok, [
        ("<|begin_of_text|>" + head.format("user") + U1 + "<|eot_id|>" + head.format("assistant"), False),
        (A1 + "<|eot_id|>", True),
        (head.format("user") + U2 + "<|eot_id|>" + head.format("assistant"), False),
        (A2 + "<|eot_id|>", True)])
    assert ex["input_ids"] == ids
    assert ex["input_ids"].count(tok.bos_token_id) == 1, "the template's BOS must not be doubled"
    assert tok(tok.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"][:2] == [tok.bos_token_id] * 2, \
        "this tokenizer adds a BOS of its own, so the test would catch a doubled one"
    assert [t for t, l in enumerate(ex["labels"]) if l != -100] == positions
    assert [tok.decode(run) for run in labelled_runs(ex)] == [A1 + "<|eot_id|>", A2 + "<|eot_id|>"]


def test_system_message_and_whitespace_trimming_template_still_pass_the_check(llama3_tok):
    msgs = [{"role": "system", "content": "You are a process engineer."},
            {"role": "user", "content": U1}, {"role": "assistant", "content": "  " + A1 + "\n"}]
    ex = encode_chat(llama3_tok, msgs, 512, "r-sys")
    assert [llama3_tok.decode(r) for r in labelled_runs(ex)] == [A1 + "<|eot_id|>"]


def test_generation_mask_and_prefix_rendering_agree_on_the_chatml_template(chatml_tok):
    """The same ChatML template with its {% generation %} markers removed takes the prefix-rendering path: the labels
    must not change."""
    conversations = [CONVERSATION, [{"role": "system", "content": "Be brief."}] + CONVERSATION[:2]]
    with_markers = [encode_chat(chatml_tok, c, 512, "r") for c in conversations]
    original = chatml_tok.chat_template
    chatml_tok.chat_template = original.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    try:
        assert [encode_chat(chatml_tok, c, 512, "r") for c in conversations] == with_markers
    finally:
        chatml_tok.chat_template = original


def test_template_that_refuses_a_conversation_is_a_record_error(llama3_tok):
    original = llama3_tok.chat_template
    llama3_tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                                "supported') }}{% endif %}" + original)
    try:
        with pytest.raises(RecordError, match="d.jsonl: record sys-1: template error .*System role not supported"):
            encode_records(llama3_tok, [{"id": "sys-1", "messages": [{"role": "system", "content": "x"}]
                                         + CONVERSATION}], 512, where="d.jsonl")
    finally:
        llama3_tok.chat_template = original


def test_template_that_loses_the_assistant_text_is_a_record_error(llama3_tok, chatml_tok):
    hidden_llama = llama3_tok.chat_template.replace("message['content'] | trim",
                                                    "(message['content'] if message['role'] != 'assistant' "
                                                    "else '[hidden]') | trim")
    hidden_chatml = chatml_tok.chat_template.replace("{{- content + '<|im_end|>' -}}", "{{- '[hidden]<|im_end|>' -}}")
    for tok, template in ((llama3_tok, hidden_llama), (chatml_tok, hidden_chatml)):
        original = tok.chat_template
        tok.chat_template = template
        try:
            assert "[hidden]" in tok.apply_chat_template(CONVERSATION, tokenize=False)
            with pytest.raises(RecordError, match=r"record r-hide: .*rendered template does not contain the "
                                                  r"assistant text where the labels say"):
                encode_chat(tok, CONVERSATION, 512, "r-hide")
        finally:
            tok.chat_template = original


# ----------------------------------------------------------------------------------------------- bad records
BAD = {
    "no assistant turn": [{"role": "user", "content": "hi"}],
    "empty assistant message": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
    "roles out of order": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}],
    "unknown role": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "hello"}],
    "bad content": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "ok"}],
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_conversation_raises_record_error_naming_file_and_record(chatml_tok, reason):
    records = [{"id": "good", "messages": CONVERSATION}, {"id": "bad-7", "messages": BAD[reason]}]
    with pytest.raises(RecordError, match=rf"^train\.jsonl: record bad-7: {reason}"):
        encode_records(chatml_tok, records, 512, where="train.jsonl")
    examples, counts = encode_records(chatml_tok, records, 512, skip_invalid=True, where="train.jsonl")
    assert [e["id"] for e in examples] == ["good"]
    assert counts == {"kept": 1, "truncated": 0, f"invalid: {reason}": 1}


def test_over_length_is_truncated_or_skipped_and_counted(chatml_tok):
    full = encode_chat(chatml_tok, CONVERSATION, 512, "long")
    n = len(full["input_ids"])
    cut = encode_chat(chatml_tok, CONVERSATION, n - 5, "long")
    assert cut["input_ids"] == full["input_ids"][:n - 5] and cut["labels"] == full["labels"][:n - 5]
    with pytest.raises(SkipRecord, match="longer than max_length"):
        encode_chat(chatml_tok, CONVERSATION, n - 5, "long", overflow="skip")
    records = [{"id": "long", "messages": CONVERSATION}, {"id": "short", "messages": CONVERSATION[:2]}]
    examples, counts = encode_records(chatml_tok, records, n - 5, overflow="skip")
    assert [e["id"] for e in examples] == ["short"] and counts["skipped: longer than max_length"] == 1
    examples, counts = encode_records(chatml_tok, records, n - 5)
    assert [e["id"] for e in examples] == ["long", "short"] and counts["truncated"] == 1
    # cut before the first assistant token: nothing left to learn -> error, or counted with skip_invalid
    first = full["labels"].index(next(l for l in full["labels"] if l != -100))
    with pytest.raises(RecordError, match="record long: no supervised tokens after truncation"):
        encode_chat(chatml_tok, CONVERSATION, first, "long")
    _, counts = encode_records(chatml_tok, records[:1], first, skip_invalid=True)
    assert counts == {"kept": 0, "truncated": 0, "invalid: no supervised tokens after truncation": 1}


def test_record_with_images_is_refused_by_the_text_only_path(chatml_tok):
    with pytest.raises(RecordError, match="f.jsonl: record img: has images"):
        encode_records(chatml_tok, [{"id": "img", "images": ["a.png"], "messages": CONVERSATION}], 512,
                       where="f.jsonl")


# ---------------------------------------------------------------------------------------------------- packing
def random_examples(n: int, lo: int, hi: int, seed: int, vocab: int = 200) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = rng.randint(1, length // 2)
        out.append({"id": f"e{i}", "input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[t + 1] from position t (HF's shift), 0 where ignored."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                             reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_per_record_losses_as_unpacked_records(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         attn_implementation=attn)).eval()
    examples = []
    for k, n in enumerate([40, 35, 30, 25, 20, 5]):
        ids = [(7 * k + 13 * j) % 196 + 4 for j in range(n)]
        examples.append({"id": f"r{k}", "input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    rows = pack_examples(examples, 80)
    assert len(rows) == 2 and sorted(r["n_records"] for r in rows) == [3, 3]
    batch = collate_chat(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["_n_tokens"] == 155
    assert batch["position_ids"][1, 75:].tolist() == [0, 1, 2, 3, 4]  # the padding is a sequence of its own

    def per_record(position_ids: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=position_ids, use_cache=False).logits
        losses, out = token_losses(logits, batch["labels"]), {}
        for b, row in enumerate(rows):
            starts = [t for t, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for start, end in zip(starts, starts[1:]):
                rid = next(e["id"] for e in examples if e["input_ids"] == row["input_ids"][start:end])
                # the loss at position t predicts token t+1: the record's own predictions are start .. end-2
                out[rid] = float(losses[b, start:end - 1].sum())
        return out

    alone = {}
    for e in examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits
        alone[e["id"]] = float(token_losses(logits, torch.tensor([e["labels"]])).sum())
    packed = per_record(batch["position_ids"])
    assert packed.keys() == alone.keys()
    # the same sums in fp32 over other shapes (a row of 80 vs the record alone): each token loss is a logsumexp over
    # the 200-token vocabulary after attention over <= 80 positions, summed over the record's tokens (Σ|x| = its loss)
    tol = {rid: fp32_sum_tol(80 + 200, alone[rid]) for rid in alone}
    for rid in alone:
        assert packed[rid] == pytest.approx(alone[rid], abs=tol[rid]), rid
    # the first label of every packed record is -100: no record learns to predict the next one's first token
    for row in rows:
        starts = [t for t, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][t] == -100 for t in starts)
    # HF's own loss on the collated batch (keys starting with "_" are not for the model) = token mean of the above.
    # use_cache=False as the loop passes it: with a cache, transformers 5.17 skips the packed-sequence mask
    model_batch = {k: v for k, v in batch.items() if not k.startswith("_")}
    with torch.no_grad():
        hf_loss = float(model(**model_batch, use_cache=False).loss)
    n_sup = sum(sum(l != -100 for l in e["labels"][1:]) for e in examples)
    # a token mean: the per-record bounds, plus n_sup more terms in the mean's own sum, divided by n_sup
    assert hf_loss == pytest.approx(sum(alone.values()) / n_sup,
                                    abs=(sum(tol.values()) + fp32_sum_tol(n_sup, sum(alone.values()))) / n_sup)
    # without restarting positions (one causal sequence per row) the records see each other: the mask matters
    width = batch["input_ids"].shape[1]
    plain = per_record(torch.arange(width).expand(len(rows), width))
    assert max(abs(plain[r] - alone[r]) - 10 * tol[r] for r in alone) > 0


def test_packing_is_deterministic_first_fit_decreasing_and_keeps_every_token():
    examples = random_examples(300, 20, 200, seed=1)
    rows = pack_examples(examples, 512)
    assert rows == pack_examples(examples, 512)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= 512 for r in rows)
    assert sum(r["n_records"] for r in rows) == 300
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    lengths = sorted((len(e["input_ids"]) for e in examples), reverse=True)  # the reference FFD, quadratic
    free: list[int] = []
    for n in lengths:
        j = next((j for j, f in enumerate(free) if f >= n), len(free))
        free[j:j + 1] = [(free[j] if j < len(free) else 512) - n]
    assert [512 - len(r["input_ids"]) for r in rows] == free
    with pytest.raises(ValueError, match="packing needs"):
        pack_examples(random_examples(1, 600, 600, seed=2), 512)


def test_packing_efficiency_is_at_least_95_percent_on_short_records(capsys):
    rows = pack_examples(random_examples(300, 20, 200, seed=0), 512)
    eff = packing_efficiency(rows, 512)
    with capsys.disabled():
        print(f"\npacking efficiency: {100 * eff:.2f}% ({len(rows)} rows of 512 for 300 records of 20-200 tokens)")
    assert eff >= 0.95


def test_unpacked_collate_pads_right_with_mask_and_ignored_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    b = collate_chat(rows, pad_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert b["_n_tokens"] == 4 and "position_ids" not in b


# ---------------------------------------------------------------------------------------------- length grouping
def test_length_grouped_permutation_is_a_deterministic_permutation_with_similar_lengths_per_micro_batch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 2000, size=1003).tolist()
    perm = length_grouped_permutation(lengths, micro_batch_size=8, seed=3, epoch=0)
    assert sorted(perm.tolist()) == list(range(1003))
    assert np.array_equal(perm, length_grouped_permutation(lengths, 8, seed=3, epoch=0))
    assert not np.array_equal(perm, length_grouped_permutation(lengths, 8, seed=3, epoch=1))
    lens = np.asarray(lengths)

    def spread(p):
        groups = lens[p[:1000]].reshape(-1, 8)
        return float(np.mean(groups.max(1) - groups.min(1)))

    assert spread(perm) < 0.1 * spread(rng.permutation(1003))
    # long and short micro-batches are interleaved, not sorted: group maxima are not monotonic
    maxima = lens[perm[:1000]].reshape(-1, 8).max(1)
    assert np.any(np.diff(maxima) > 0) and np.any(np.diff(maxima) < 0)


def fake_flash_attn(calls: list):
    """flash_attn 2's flash_attn_func / flash_attn_varlen_func signatures, computed with SDPA on CPU ([tokens, heads,
    dim] layout, GQA by repeating KV heads, causal within each cu_seqlens segment); every call is recorded."""
    def attend(q, k, v, scale, causal):  # [T, H, D] each
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                               is_causal=causal, scale=scale)
        return out.transpose(0, 1)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
        calls.append({"fn": "flash_attn_func", "rows": q.shape[0]})
        return torch.stack([attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        cu = cu_seqlens_q.tolist()
        calls.append({"fn": "flash_attn_varlen_func", "cu_seqlens": cu, "max_seqlen": max_seqlen_q})
        assert cu_seqlens_k.tolist() == cu and cu[-1] == q.shape[0] and max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
        return torch.cat([attend(q[a:b], k[a:b], v[a:b], softmax_scale, causal) for a, b in zip(cu, cu[1:])])

    return flash_attn_func, flash_attn_varlen_func


def test_packed_rows_under_flash_attention_reach_the_kernel_as_one_sequence_per_record(monkeypatch):
    """transformers 5.17 runs flash varlen from position_ids only for a single row (_is_packed_sequence:
    `batch_size == 1`): a packed micro-batch of several rows must carry its record boundaries itself."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import modeling_flash_attention_utils as fa

    calls = []
    flash_fn, varlen_fn = fake_flash_attn(calls)
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: (
        (flash_fn, varlen_fn, None, None, None), fa._lazy_define_process_function(varlen_fn)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         attn_implementation="sdpa")).eval()
    examples = []
    for k, n in enumerate([40, 35, 30, 25, 20, 5]):
        ids = [(7 * k + 13 * j) % 196 + 4 for j in range(n)]
        examples.append({"id": f"r{k}", "input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    rows = pack_examples(examples, 80)
    assert len(rows) == 2
    n_sup = sum(sum(l != -100 for l in e["labels"][1:]) for e in examples)
    with torch.no_grad():
        alone = sum(float(token_losses(model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits,
                                       torch.tensor([e["labels"]])).sum()) for e in examples) / n_sup
        model.config._attn_implementation = "flash_attention_2"  # the fake kernels above
        batch = collate_chat(rows, pad_id=0, varlen=True)
        loss = float(model(**{k: v for k, v in batch.items() if not k.startswith("_")}, use_cache=False).loss)
        varlen_calls, calls[:] = list(calls), []
        plain = collate_chat(rows, pad_id=0)  # what SDPA gets: position_ids only
        mixed = float(model(**{k: v for k, v in plain.items() if not k.startswith("_")}, use_cache=False).loss)
    # every layer's kernel saw the six records (and the second row's 5-token padding tail), not two long rows
    width = batch["input_ids"].shape[1]
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert len(varlen_calls) == 2 and all(c["fn"] == "flash_attn_varlen_func" for c in varlen_calls)
    cu = varlen_calls[0]["cu_seqlens"]
    assert len(cu) - 1 == len(examples) + (lengths[0] < width) and cu[-1] == 2 * width
    assert loss == pytest.approx(alone, abs=1e-5)
    # the fault this guards against: without the boundaries flash runs each row as one causal sequence
    assert all(c["fn"] == "flash_attn_func" for c in calls) and mixed != pytest.approx(alone, abs=1e-4)
