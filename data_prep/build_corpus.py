"""Build the domain-pretraining corpus: PDF/Markdown/text files -> cleaned documents -> packed token blocks.

    python data_prep/build_corpus.py --out runs/demo/corpus                       # CPU debug: built-in corpus, trained BPE
    python data_prep/build_corpus.py --out /scratch/corpus --inputs /data/papers --tokenizer meta-llama/Llama-3.1-8B --block_size 4096 --num_workers 16
    srun -N1 -c 16 python data_prep/build_corpus.py --config launch/configs/semikong_8b/corpus.yaml

Pipeline: read (pypdf per page; UTF-8 text) -> clean (repeated headers/footers and page numbers dropped, line-break
hyphens joined, soft line breaks inside paragraphs joined, control characters removed) -> drop short, exact-duplicate
and near-duplicate documents (MinHash over word 5-shingles, LSH candidates, estimated Jaccard >= near_dup_threshold;
a threshold > 1 disables it) -> split by DOCUMENT (seeded) -> tokenizer (given, or a byte-level BPE trained on the train
split) -> each document tokenised without special tokens, EOS appended, concatenated, cut into block_size blocks.

Bad input is skipped, counted by reason in stats.json and named in a `skip <path>: <reason>` line: zero_bytes, empty,
too_short, non_utf8, encrypted, unreadable_pdf, pdf_no_text. Text files are decoded as strict UTF-8 (a BOM is dropped);
a file with fewer than 1% undecodable bytes is kept with those bytes removed (counted as `decoded_lossy`), otherwise it
is skipped as non_utf8. Hidden files and folders (.git, .DS_Store) are ignored.

Outputs in --out: documents.jsonl, tokenizer/, train/ and validation/ (datasets.save_to_disk, one column `input_ids`,
every row exactly block_size long), stats.json, config.json.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing as mp
import re
import shutil
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semivlm.config import ConfigError, load_config, save_config

FORMATS = {".pdf": "pdf", ".md": "md", ".markdown": "md", ".txt": "txt"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
# ChatML. Content is a string or a list of typed parts ({"type": "text"} / {"type": "image"} -> "<image>"), parts joined
# by "\n". Assistant content + <|im_end|> sit inside {% generation %} so return_assistant_tokens_mask works.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(items=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.items = parts.items + ['<image>'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.items = parts.items + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = parts.items | join('\\n') -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}{%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass
class CorpusConfig:
    out: str = ""                                                   # output directory (required)
    inputs: list[str] = field(default_factory=lambda: ["data/corpus"])  # files or folders (recursed)
    tokenizer: str = ""                 # HF tokenizer dir or hub id; "" = train a byte-level BPE on the train split
    vocab_size: int = 4096              # only for the trained tokenizer
    block_size: int = 256
    val_fraction: float = 0.05          # fraction of DOCUMENTS held out (at least one, and at least one block)
    seed: int = 0
    near_dup_threshold: float = 0.8     # estimated Jaccard of word 5-shingles; > 1 disables near-dup removal
    min_chars: int = 200                # shorter cleaned documents are dropped
    num_workers: int = 1                # processes reading and cleaning files


# ----------------------------------------------------------------------------------------------------- cleaning
# PDF ligatures spelled out; soft hyphens, zero-width characters, BOMs and U+FFFD dropped
TRANSLATE = {**{ord(k): v for k, v in {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi",
                                       "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st"}.items()},
             **dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff\ufffd"), None)}
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ue000-\uf8ff]")  # C0/C1 (not \t \n), surrogates, private use
PAGE_NUMBER = re.compile(r"^(?:page\s*)?[-\u2013\u2014]?\s*\d{1,4}\s*[-\u2013\u2014]?(?:\s*(?:of|/)\s*\d{1,4})?$", re.I)
BLOCK_START = re.compile(r"^(?:#{1,6}\s|[-*+\u2022\u25aa]\s|\d{1,3}[.)]\s|\||>)")
NO_CONTINUATION = re.compile(r"^(?:#{1,6}\s|\||```)")                   # headings, table rows, code fences


def _line_key(line: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\d+", "#", line.strip().lower()))


def strip_headers_footers(pages: list[str], zone: int = 2) -> str:
    """Join PDF pages, dropping page numbers and lines recurring at the top/bottom of at least half of the pages."""
    split = [p.splitlines() for p in pages]
    zones = []
    for lines in split:
        idx = [i for i, line in enumerate(lines) if line.strip()]
        zones.append(sorted(set(idx[:zone] + idx[-zone:])))
    counts = Counter(k for lines, z in zip(split, zones) for k in {_line_key(lines[i]) for i in z})
    recurring = {k for k, c in counts.items() if len(pages) >= 2 and c >= max(2, len(pages) / 2)}
    kept = []
    for lines, z in zip(split, zones):
        drop = {i for i in z if _line_key(lines[i]) in recurring or PAGE_NUMBER.match(lines[i].strip())}
        kept.append("\n".join(line for i, line in enumerate(lines) if i not in drop))
    return "\n".join(kept)


def normalize_text(text: str) -> str:
    """Control characters out, hyphenated line breaks joined, paragraphs kept, soft line breaks joined."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n").translate(TRANSLATE)
    text = CONTROL.sub(" ", text)
    text = re.sub(r"(?<=[A-Za-z])-[ \t]*\n[ \t]*(?=[a-z])", "", text)         # semi-\nconductor -> semiconductor
    paragraphs, current, in_code = [], [], False
    for raw in text.split("\n") + [""]:
        line = " ".join(raw.split())                                         # unicode spaces, runs of spaces
        if line.startswith("```"):
            in_code = not in_code
        if in_code or line.startswith("```"):                              # fenced code kept verbatim
            current.append(raw.rstrip())
            continue
        if not line:
            if current:
                paragraphs.append("\n".join(current))
            current = []
        elif current and not BLOCK_START.match(line) and not NO_CONTINUATION.match(current[-1]):
            current[-1] += " " + line                                      # soft line break inside a paragraph
        else:
            current.append(line)
    if current:                                                            # an unclosed code fence
        paragraphs.append("\n".join(current))
    return "\n\n".join(paragraphs).strip()


def read_document(path: str) -> tuple[str | None, str]:
    """Return (cleaned text, "") or (None, skip reason). Never raises on bad input."""
    p = Path(path)
    fmt = FORMATS[p.suffix.lower()]
    try:
        data = p.read_bytes()
    except OSError as e:
        return None, f"unreadable ({e.strerror})"
    if not data:
        return None, "zero_bytes"
    note = ""
    if fmt == "pdf":
        import pypdf
        logging.getLogger("pypdf").setLevel(logging.ERROR)
        try:
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                return None, "encrypted"
            pages = [pg.extract_text() or "" for pg in reader.pages]
        except pypdf.errors.DependencyError:
            return None, "encrypted"
        except Exception as e:  # pypdf raises many exception types on malformed files
            return None, f"unreadable_pdf ({type(e).__name__}: {str(e)[:80]})"
        if not any(pg.strip() for pg in pages):
            return None, "pdf_no_text"
        text = strip_headers_footers(pages)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("utf-8-sig", errors="replace")
            if text.count("\ufffd") >= 0.01 * len(data):
                return None, "non_utf8"
            note = "decoded_lossy"
    text = normalize_text(text)
    return (text, note) if text else (None, "empty")


# --------------------------------------------------------------------------------------------- deduplication
@functools.lru_cache(maxsize=None)
def _hash_params(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    return rng.integers(0, 2**64, num_perm, dtype=np.uint64) | np.uint64(1), rng.integers(0, 2**64, num_perm, dtype=np.uint64)


def minhash(text: str, shingle: int = 5, num_perm: int = 128) -> np.ndarray:
    """MinHash signature of the set of word `shingle`-grams: multiply-shift hashes ((a*x + b) mod 2^64) >> 32."""
    words = re.findall(r"\w+", text.lower())
    grams = {" ".join(words[i:i + shingle]) for i in range(max(1, len(words) - shingle + 1))}
    x = np.unique(np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams)))
    a, b = _hash_params(num_perm)
    sig = np.full(num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for s in range(0, len(x), 4096):
        sig = np.minimum(sig, ((a[:, None] * x[None, s:s + 4096] + b[:, None]) >> np.uint64(32)).min(axis=1))
    return sig


def read_and_sign(path: str) -> tuple[str | None, str, np.ndarray | None]:
    """read_document plus the MinHash signature, so that worker processes do both."""
    text, reason = read_document(path)
    return text, reason, (minhash(text) if text else None)


class NearDup:
    """LSH over MinHash signatures (32 bands of 4 rows): candidates are checked by estimated Jaccard."""

    def __init__(self, threshold: float, num_perm: int = 128, bands: int = 32):
        self.threshold, self.bands, self.rows = threshold, bands, num_perm // bands
        self.buckets: dict = defaultdict(list)
        self.sigs: list[np.ndarray] = []

    def is_duplicate(self, sig: np.ndarray) -> bool:
        """True if `sig` is a near duplicate of a document added before; otherwise remember it."""
        if self.threshold > 1:
            return False
        keys = [(i, sig[i * self.rows:(i + 1) * self.rows].tobytes()) for i in range(self.bands)]
        candidates = {j for key in keys for j in self.buckets.get(key, ())}
        if any(np.mean(self.sigs[j] == sig) >= self.threshold for j in candidates):
            return True
        for key in keys:
            self.buckets[key].append(len(self.sigs))
        self.sigs.append(sig)
        return False


# ------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int = 2048):
    """Byte-level BPE with the project's special tokens and ChatML template, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                 extra_special_tokens=SPECIAL_TOKENS[2:], model_max_length=model_max_length)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise SystemExit(f"tokenizer directory '{name}' does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if name.startswith("~") else name)
    except Exception as e:
        raise SystemExit(f"cannot load tokenizer '{name}': not a tokenizer directory and not loadable from the "
                         f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if tok.eos_token_id is None:
        raise SystemExit(f"tokenizer '{name}' has no EOS token; documents could not be separated (set eos_token)")
    return tok


# ---------------------------------------------------------------------------------------------------- driver
def log(msg: str) -> None:
    print(f"[build_corpus] {msg}", flush=True)

def progress(what: str, i: int, n: int, t0: float, last: list) -> None:
    now = time.time()
    if i == n or now - last[0] >= 10 or (n >= 50 and i % (n // 10) == 0):
        el = now - t0
        log(f"{what} {i}/{n}, {el:.1f}s elapsed, ETA {el / max(i, 1) * (n - i):.1f}s")
        last[0] = now


def list_files(inputs: list[str]) -> list[Path]:
    files, seen = [], set()
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise SystemExit(f"input path '{item}' does not exist")
        found = [p] if p.is_file() else sorted(
            f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    return files


def main(cfg: CorpusConfig) -> dict:
    if not cfg.out:
        raise ConfigError("--out is required (the output directory)")
    if not 0 <= cfg.val_fraction < 1 or cfg.block_size < 2 or cfg.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError("need 0 <= val_fraction < 1, block_size >= 2 and vocab_size >= 260")
    t_start, out = time.time(), Path(cfg.out)
    inputs = list(cfg.inputs)
    files = list_files(inputs)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None    # fail fast, before the long work
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    skipped, notes = Counter(), Counter()
    readable = [f for f in files if f.suffix.lower() in FORMATS]
    unsupported = Counter(f.suffix.lower() or "(none)" for f in files if f.suffix.lower() not in FORMATS)
    skipped["unsupported_extension"] = sum(unsupported.values())
    log(f"{len(files)} files under {inputs}: {len(readable)} PDF/Markdown/text"
        + (f", {len(files) - len(readable)} skipped for their extension {dict(unsupported)}" if unsupported else ""))

    names = [str(f) for f in readable]
    pool = mp.get_context("spawn").Pool(cfg.num_workers) if cfg.num_workers > 1 else None
    results = pool.imap(read_and_sign, names, chunksize=4) if pool else map(read_and_sign, names)
    docs, hashes, near = [], set(), NearDup(cfg.near_dup_threshold)
    dups, t0, last = Counter(), time.time(), [time.time()]
    for i, (path, (text, reason, sig)) in enumerate(zip(readable, results), 1):
        if text is not None and len(text) < cfg.min_chars:
            text, reason = None, f"too_short ({len(text)} < {cfg.min_chars} chars)"
        if text is None:
            skipped[reason.split(" ")[0]] += 1
            log(f"skip {path}: {reason}")
        else:
            notes.update([reason] if reason else [])
            digest = hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()
            if digest in hashes:
                dups["exact"] += 1
                log(f"skip {path}: exact duplicate")
            elif near.is_duplicate(sig):
                dups["near"] += 1
                log(f"skip {path}: near duplicate (Jaccard >= {cfg.near_dup_threshold})")
            else:
                hashes.add(digest)
                docs.append({"id": digest[:16], "source": str(path), "format": FORMATS[path.suffix.lower()],
                             "n_chars": len(text), "split": "train", "text": text})
        progress("read", i, len(readable), t0, last)
    if pool:
        pool.close()
        pool.join()
    if len(docs) < 2:
        raise SystemExit(f"corpus too small: {len(docs)} usable document(s) in {inputs}; need at least 2 "
                         "(one for train, one for validation)")

    # split by document: a seeded order; validation takes the first docs until it has its share and ~one block
    order = [int(i) for i in np.random.default_rng(cfg.seed).permutation(len(docs))]
    n_val = min(len(docs) - 1, max(1, round(cfg.val_fraction * len(docs))))
    while n_val < len(docs) - 1 and sum(docs[i]["n_chars"] for i in order[:n_val]) < 6 * cfg.block_size:
        n_val += 1
    for i in order[:n_val]:
        docs[i]["split"] = "validation"

    if tok is None:
        log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {len(docs) - n_val} train documents")
        tok = train_tokenizer([docs[i]["text"] for i in order[n_val:]], cfg.vocab_size, max(2048, cfg.block_size))
    eos = tok.eos_token_id
    ids, t0, last = [None] * len(docs), time.time(), [time.time()]
    for s in range(0, len(docs), 64):
        batch = tok([d["text"] for d in docs[s:s + 64]], add_special_tokens=False, verbose=False,
                    return_attention_mask=False)["input_ids"]
        ids[s:s + len(batch)] = [np.asarray(x, dtype=np.int32) for x in batch]      # 4 bytes a token in memory
        progress("tokenised documents", min(s + 64, len(docs)), len(docs), t0, last)
    moved = 0                       # token counts known now: make sure validation holds at least one block
    while sum(len(ids[i]) + 1 for i in order[:n_val]) < cfg.block_size and n_val < len(docs) - 1:
        docs[order[n_val]]["split"], n_val, moved = "validation", n_val + 1, moved + 1

    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    split_stats = {}
    for split, members in (("train", order[n_val:]), ("validation", order[:n_val])):
        eos_arr = np.array([eos], dtype=np.int32)
        flat = np.concatenate([a for i in members for a in (ids[i], eos_arr)], dtype=np.int64)
        n_blocks = len(flat) // cfg.block_size
        if n_blocks == 0:
            raise SystemExit(f"corpus too small: the {split} split has {len(flat)} tokens, fewer than one block of "
                             f"{cfg.block_size}; add documents or lower --block_size")
        table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(
            pa.array(flat[:n_blocks * cfg.block_size]), cfg.block_size)})
        shutil.rmtree(out / split, ignore_errors=True)
        datasets.Dataset(table).save_to_disk(str(out / split))
        split_stats[split] = {"documents": len(members), "chars": sum(docs[i]["n_chars"] for i in members),
                              "tokens": len(flat), "blocks": n_blocks,
                              "dropped_tokens": len(flat) - n_blocks * cfg.block_size}
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    tok.save_pretrained(str(out / "tokenizer"))
    with open(out / "documents.jsonl", "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")

    stats = {
        "files_seen": len(files), "documents_kept": len(docs),
        "skipped": {k: v for k, v in sorted(skipped.items()) if v}, "unsupported_extensions": dict(unsupported),
        "duplicates_removed": {"exact": dups["exact"], "near": dups["near"]}, "notes": dict(notes),
        "chars": sum(d["n_chars"] for d in docs), "tokens": sum(s["tokens"] for s in split_stats.values()),
        "splits": split_stats, "validation_docs_moved_for_one_block": moved, "block_size": cfg.block_size,
        "tokenizer": {"source": cfg.tokenizer or f"byte-level BPE (vocab {cfg.vocab_size}) trained on the train split",
                      "class": type(tok).__name__, "vocab_size": len(tok), "eos_token": tok.eos_token,
                      "eos_token_id": eos},
        "seconds": round(time.time() - t_start, 2),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"kept {len(docs)}/{len(files)} files, {stats['chars']} chars, {stats['tokens']} tokens; blocks train "
        f"{split_stats['train']['blocks']} / validation {split_stats['validation']['blocks']}; "
        f"skipped {stats['skipped']}, duplicates {stats['duplicates_removed']}; {stats['seconds']}s -> {out}")
    return stats


if __name__ == "__main__":
    main(load_config(CorpusConfig))
