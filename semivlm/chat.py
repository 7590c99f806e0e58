"""Chat SFT data: conversations -> token ids with assistant-only labels, checked per record; packing; length grouping.

Why this module exists: the classic way to build SFT labels (LLaVA's) tokenises the rendered conversation piece by
piece and *assumes* the pieces line up with the full tokenisation; when a template or tokenizer breaks that
assumption the labels are silently shifted or all -100, the loss is 0 and training looks fine. Here labels come from
the template itself and every record is verified:

* templates with `{% generation %}` blocks (the debug ChatML tokenizer): HF's `return_assistant_tokens_mask`;
* any other template (Llama-3, Gemma, Mistral ...): each assistant turn's character span is found by rendering the
  conversation up to that turn with `add_generation_prompt=True` and again including the turn; the full rendering is
  tokenised ONCE (`add_special_tokens=False`: templates render their own BOS) and characters are mapped to tokens
  with `return_offsets_mapping`, so merges across a boundary cannot shift anything;
* then the decoded labelled tokens of every assistant turn must contain that turn's text (whitespace-normalised),
  and at least one supervised token must remain: otherwise RecordError naming the record (or, when the user asked
  for skipping, counted). Labels cover the assistant text and the token(s) that end the turn (<|im_end|>,
  <|eot_id|>), so the model learns to stop.

Packing (first-fit-decreasing) puts several records in one row with position_ids restarting at 0 per record and no
attention_mask: transformers 5 then builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices)
for SDPA/eager and flash-attention runs varlen, so a packed row computes exactly the per-record losses of unpacked
rows (tests/test_chat.py proves it). length_grouped_permutation gives micro-batches of similar lengths for unpacked
training.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

from semivlm.data import RecordError

ROLES = ("system", "user", "assistant")
OVERFLOW = ("truncate", "skip")
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


class SkipRecord(RecordError):
    """A record the user asked to skip (counted by reason), e.g. over-length with overflow="skip"."""

    def __init__(self, reason: str, record_id: str = ""):
        super().__init__(f"record {record_id}: {reason}" if record_id else reason)
        self.reason, self.record_id = reason, record_id


def record_error(record_id: str, reason: str, detail: str = "") -> RecordError:
    """A RecordError naming the record, with a short `reason` for counting."""
    err = RecordError(f"record {record_id}: {reason}" + (f" ({detail})" if detail else ""))
    err.reason = reason
    return err


def _norm(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------- validation
def _content_text(content, record_id: str, i: int) -> str:
    """A message's content as one string: a string, or typed text parts joined by "\\n" (as the debug template
    joins them). Anything else (image parts included: this is the text-only path) is a RecordError."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    detail = f"message {i + 1}: content must be a string or a list of {{'type': 'text', 'text': str}} parts"
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in content):
        detail += "; image parts belong to the multimodal path"
    raise record_error(record_id, "bad content", detail)


def normalise_messages(messages, record_id: str) -> list[dict]:
    """Validate roles and contents; return [{"role", "content": str}]. Optional leading system message, then
    user/assistant alternating from user, ending on assistant; no empty assistant message."""
    if not isinstance(messages, list) or not messages:
        raise record_error(record_id, "no messages", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise record_error(record_id, "bad message", f"message {i + 1} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise record_error(record_id, "unknown role",
                               f"message {i + 1} has role {m['role']!r}; expected one of {ROLES}")
        out.append({"role": m["role"], "content": _content_text(m["content"], record_id, i)})
    if not any(m["role"] == "assistant" for m in out):
        raise record_error(record_id, "no assistant turn", "nothing to supervise")
    body = out[1:] if out[0]["role"] == "system" else out
    offset = len(out) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise record_error(record_id, "roles out of order", f"message {i + 1 + offset} is {m['role']!r}, expected "
                               f"{expected!r} (optional system first, then user/assistant alternating from user)")
    if body[-1]["role"] != "assistant":
        raise record_error(record_id, "roles out of order", "the conversation does not end with an assistant turn")
    for i, m in enumerate(out):
        if m["role"] == "assistant" and not m["content"].strip():
            raise record_error(record_id, "empty assistant message", f"message {i + 1}")
    return out


# ------------------------------------------------------------------------------------------ assistant spans
def _render(tokenizer, messages: list[dict], record_id: str, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as e:  # jinja raise_exception, TemplateError, ...: the template refused this conversation
        raise record_error(record_id, "template error", f"{type(e).__name__}: {e}") from None


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for t, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t))
            start = None
    return runs


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    return ids


def _spans_generation(tokenizer, messages, record_id):
    """{% generation %} templates: HF's assistant mask, one run per assistant turn. A run that stops just before a
    special token (a template that puts <|im_end|> outside the block) is extended over it so the model learns to
    stop."""
    enc = _render(tokenizer, messages, record_id, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, runs = list(enc["input_ids"]), _runs(enc["assistant_masks"])
    n_turns = sum(m["role"] == "assistant" for m in messages)
    if len(runs) != n_turns:
        raise record_error(record_id, "template mask mismatch",
                           f"the template's {{% generation %}} blocks give {len(runs)} "
                           f"labelled span(s) for {n_turns} assistant turn(s)")
    special = _special_ids(tokenizer)
    spans = []
    for start, end in runs:
        if end < len(ids) and ids[end] in special and ids[end - 1] not in special:
            end += 1
        spans.append((start, end))
    return ids, spans


def _spans_by_prefix(tokenizer, messages, record_id):
    """Any template: character spans from prefix renderings, mapped to the one tokenisation of the full text."""
    full = _render(tokenizer, messages, record_id, tokenize=False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], record_id, tokenize=False, add_generation_prompt=True)
        upto = _render(tokenizer, messages[:i + 1], record_id, tokenize=False)
        if not upto.startswith(before):
            raise record_error(record_id, "template mask mismatch",
                               f"message {i + 1}: rendering the conversation up to this "
                               "assistant turn does not extend the rendering with the generation prompt")
        piece = upto[len(before):].rstrip()  # assistant text + end-of-turn marker, not the newline after it
        if full.startswith(upto) and len(before) >= cursor:
            a = len(before)
        else:  # the template renders earlier turns differently once more follow: find this turn's text in context
            a = full.find(piece, cursor) if piece else -1
            if a < 0:
                raise record_error(record_id, "template mask mismatch",
                                   f"message {i + 1}: the assistant turn as rendered "
                                   "alone is not found in the rendering of the whole conversation")
        b = a + len(piece)
        cursor = b
        toks = [t for t, (s, e) in enumerate(offsets) if s < b and e > a and e > s]
        spans.append((toks[0], toks[-1] + 1) if toks else (0, 0))
    return ids, spans


def _encode(tokenizer, messages, max_length: int, record_id: str, overflow: str) -> tuple[dict, int]:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, not {overflow!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, not {max_length}")
    msgs = normalise_messages(messages, record_id)
    template = tokenizer.get_chat_template()  # no template at all: ValueError, a setup error, not a bad record
    find_spans = _spans_generation if GENERATION_BLOCK.search(template) else _spans_by_prefix
    ids, spans = find_spans(tokenizer, msgs, record_id)

    # the check: every assistant turn's labelled tokens must decode to text containing that turn's content
    texts = [m["content"] for m in msgs if m["role"] == "assistant"]
    for k, ((a, b), text) in enumerate(zip(spans, texts)):
        decoded = tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if _norm(text) not in _norm(decoded):
            raise record_error(record_id, "assistant text not labelled", f"rendered template does not contain the "
                               f"assistant text where the labels say: assistant turn {k + 1}: expected {text[:80]!r}, "
                               f"labelled tokens decode to {decoded[:80]!r}")
    labels = [-100] * len(ids)
    for a, b in spans:
        labels[a:b] = ids[a:b]
    labels[0] = -100  # nothing predicts the first token

    n_full = len(ids)
    if n_full > max_length:
        if overflow == "skip":
            raise SkipRecord("longer than max_length", record_id)
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels):
        if n_full > max_length:
            raise record_error(record_id, "no supervised tokens after truncation",
                               f"the conversation is {n_full} tokens and its first assistant turn starts at "
                               f"token {spans[0][0]}, beyond max_length={max_length}")
        raise record_error(record_id, "no supervised tokens", "the template leaves every label at -100")
    return {"input_ids": ids, "labels": labels}, n_full


def encode_chat(tokenizer, messages: list[dict], max_length: int, record_id: str, overflow: str = "truncate") -> dict:
    """{"input_ids": list[int], "labels": list[int]}: labels are -100 except on assistant content tokens and the
    token(s) that end each assistant turn (e.g. <|im_end|> / <|eot_id|>), so the model learns to stop.

    Longer than max_length: overflow="truncate" cuts it (RecordError if no supervised token remains), "skip" raises
    SkipRecord. Bad conversations raise RecordError naming `record_id`."""
    return _encode(tokenizer, messages, max_length, record_id, overflow)[0]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens generation should stop at: eos, plus the special token(s) the chat template ends an assistant
    turn with (<|im_end|>, <|eot_id|> ...), found as the special tokens among a rendered reply's labels. Without
    them a ChatML model whose eos is <|endoftext|> never stops after its answer."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        try:
            enc = encode_chat(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                              64, "end-of-turn probe")
        except RecordError:
            return ids
        special = set(tokenizer.all_special_ids)
        ids += [t for t in enc["labels"] if t in special and t not in ids]
    return ids


def named_error(e: RecordError, where: str) -> RecordError:
    """The same error (and reason) with the file name in front; SkipRecord is left alone (it is counted)."""
    if not where or isinstance(e, SkipRecord):
        return e
    err = RecordError(f"{where}: {e}")
    err.reason = getattr(e, "reason", "invalid")
    return err


def encode_counted(records, encode_one, skip_invalid: bool, where: str = "",
                   count_truncated: bool = True) -> tuple[list[dict], dict]:
    """The loop every record encoder shares: `encode_one(record, n)` -> (example, truncated?) for the n-th record.
    Returns (examples, counts): counts["kept"], ["truncated"] (kept, but cut), ["skipped: <reason>"] (SkipRecord,
    always counted) and ["invalid: <reason>"] (only with skip_invalid; otherwise the first bad record's RecordError
    is raised with `where` in front)."""
    examples, counts = [], Counter()
    for n, rec in enumerate(records, 1):
        try:
            example, truncated = encode_one(rec, n)
        except SkipRecord as e:
            counts[f"skipped: {e.reason}"] += 1
            continue
        except RecordError as e:
            if not skip_invalid:
                raise named_error(e, where) from None
            counts[f"invalid: {getattr(e, 'reason', 'invalid')}"] += 1
            continue
        counts["kept"] += 1
        if count_truncated:
            counts["truncated"] += bool(truncated)
        examples.append(example)
    counts.setdefault("kept", 0)
    if count_truncated:
        counts.setdefault("truncated", 0)
    return examples, dict(counts)


def encode_records(tokenizer, records, max_length: int, overflow: str = "truncate", skip_invalid: bool = False,
                   where: str = "") -> tuple[list[dict], dict]:
    """records: iterable of our JSONL records (text-only; message content a string or typed parts
    [{"type":"text","text":...}]). Returns (examples [{"id", "input_ids", "labels"}], counts) as encode_counted."""
    def encode_one(rec, n):
        rid = str(rec.get("id")) if isinstance(rec, dict) and rec.get("id") not in (None, "") else f"#{n}"
        if not isinstance(rec, dict):
            raise record_error(rid, "not an object", f"got {type(rec).__name__}")
        if rec.get("images"):
            raise record_error(rid, "has images", "chat SFT here is text-only; image records go to the multimodal path")
        example, n_full = _encode(tokenizer, rec.get("messages"), max_length, rid, overflow)
        return {"id": rid, **example}, n_full > max_length

    return encode_counted(records, encode_one, skip_invalid, where)


# ---------------------------------------------------------------------------------------------------- packing
def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing (deterministic) packing into rows {"input_ids","labels","position_ids","n_records"};
    position_ids restart at 0 for each record; the first label of each record is -100 so the previous record's last
    token never learns to predict it. O(n log n): a max-tree over the rows' free space finds the first fit."""
    lengths = [len(e["input_ids"]) for e in examples]
    for e, n in zip(examples, lengths):
        if n > max_length or n == 0:
            raise ValueError(f"example {e.get('id', '?')} has {n} tokens; packing needs 1..max_length={max_length} "
                             "(encode with the same max_length)")
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])  # stable: ties keep input order
    size = 1
    while size < max(1, len(examples)):
        size *= 2
    free = [0] * size + [max_length] * size  # leaves: free space of row j (rows not opened yet are empty)
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    members: list[list[int]] = []
    for i in order:
        node = 1
        while node < size:  # leftmost row with enough room
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        row = node - size
        if row == len(members):
            members.append([])
        members[row].append(i)
        free[node] -= lengths[i]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    rows = []
    for idx in members:
        ids, labels, pos = [], [], []
        for i in idx:
            ids += examples[i]["input_ids"]
            labels += [-100] + list(examples[i]["labels"][1:])
            pos += range(lengths[i])
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "n_records": len(idx)})
    return rows


def packing_efficiency(rows: list[dict], max_length: int) -> float:
    """Non-padding share of the tokens when each row is padded to max_length."""
    return sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_length) if rows else 0.0


def collate_chat(rows: list[dict], pad_id: int, varlen: bool = False) -> dict:
    """Tensors. Unpacked rows: input_ids right-padded with pad_id, attention_mask, labels -100 on padding.
    Packed rows (they carry position_ids): input_ids, labels, position_ids padded at the right (padding gets its own
    positions 0,1,2,… and labels -100) and NO attention_mask: transformers 5.17 then builds a block-diagonal causal
    mask from the restarting position_ids for SDPA/eager (masking_utils.find_packed_sequence_indices).
    Flash-attention infers varlen from position_ids only for a single row (modeling_flash_attention_utils.
    _is_packed_sequence: `batch_size == 1`); with more rows it would run one causal sequence per row and the records
    would see each other. So `varlen=True` (set it under flash-attention) adds cu_seq_lens_q/k and max_length_q/k:
    the sequence boundaries over the flattened batch, one sequence per record (and one per padding tail), which
    transformers hands to flash_attn_varlen_func. Also a key "_n_tokens" (int: non-padding tokens) — keys starting
    with "_" are read by the loop for throughput and never passed to the model.

    Call the model with use_cache=False on packed batches (the loop does): with a KV cache, transformers 5.17 skips
    the packed-sequence detection and records silently attend to each other."""
    import torch

    if not rows:
        raise ValueError("collate_chat needs at least one row")
    packed = ["position_ids" in r for r in rows]
    if any(packed) and not all(packed):
        raise ValueError("collate_chat: mixed packed and unpacked rows in one batch")
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    if all(packed):
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["position_ids"])
            position_ids[b, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
            position_ids[b, n:] = torch.arange(width - n)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "_n_tokens": n_tokens}
        if varlen:
            flat = position_ids.flatten()
            cu = torch.cat([torch.nonzero(flat == 0).flatten(), torch.tensor([flat.numel()])]).to(torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return batch
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        attention_mask[b, :len(r["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "_n_tokens": n_tokens}


# ----------------------------------------------------------------------------------------------- length grouping
def length_grouped_permutation(lengths: list[int], micro_batch_size: int, seed: int, epoch: int,
                               mega_batch: int = 50) -> np.ndarray:
    """A permutation of range(len(lengths)): shuffled by (seed, epoch), then within mega-batches of
    micro_batch_size*mega_batch sorted by length, so that consecutive groups of micro_batch_size indices have similar
    lengths (the loop takes consecutive positions of this permutation as a micro-batch); the micro-batch groups are
    then shuffled so long and short ones are interleaved. Deterministic. A last, partial group stays last, so every
    full group starts at a multiple of micro_batch_size."""
    if micro_batch_size < 1 or mega_batch < 1:
        raise ValueError("micro_batch_size and mega_batch must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(len(lengths))
    chunk = micro_batch_size * mega_batch
    for s in range(0, len(perm), chunk):
        part = perm[s:s + chunk]
        perm[s:s + chunk] = part[np.argsort(-lengths[part], kind="stable")]
    n_full = len(perm) // micro_batch_size
    groups = perm[:n_full * micro_batch_size].reshape(n_full, micro_batch_size)
    return np.concatenate([groups[rng.permutation(n_full)].reshape(-1), perm[n_full * micro_batch_size:]])
