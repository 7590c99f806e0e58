"""Build the domain-pretraining corpus: PDF/Markdown/text files -> cleaned documents -> packed token blocks.

    python data_prep/build_corpus.py --out runs/demo/corpus                       # CPU debug: built-in corpus, trained BPE
    python data_prep/build_corpus.py --out /scratch/corpus --inputs /data/papers --tokenizer meta-llama/Llama-3.1-8B --block_size 4096 --num_workers 16
    srun -N1 -c 16 python data_prep/build_corpus.py --config launch/configs/semikong_8b/corpus.yaml

Pipeline, streamed (memory does not grow with the corpus): read, in --num_workers processes (pypdf per page; UTF-8
text) -> clean (repeated headers/footers and page numbers dropped, line-break hyphens joined, soft line breaks inside
paragraphs joined, control characters removed) -> drop short, exact-duplicate (sha256 of the whitespace/case-folded
text; a set of 16-byte digests, ~100 bytes per kept document) and near-duplicate documents (MinHash over word
5-shingles, LSH candidates, estimated Jaccard >= near_dup_threshold; a threshold > 1 disables it; the LSH index is an
SQLite file, so memory holds only its page cache) -> each kept document is appended to disk as it comes -> split by
DOCUMENT (seeded) -> tokenizer (given, or a byte-level BPE trained from an iterator over the train documents read back
from disk) -> documents tokenised in batches over the worker processes, each followed by EOS, concatenated in the
split's order and cut into block_size blocks, written shard by shard. Peak memory is set by fixed buffers (BATCH_CHARS,
FLUSH_TOKENS, a few tasks in flight per worker) and the largest single document, not by the corpus size.

Bad input is skipped, counted by reason in stats.json and named in a `skip <path>: <reason>` line: zero_bytes, empty,
too_short, non_utf8, encrypted, unreadable_pdf, pdf_no_text. Text files are decoded as strict UTF-8 (a BOM is dropped);
a file with fewer than 1% undecodable bytes is kept with those bytes removed (counted as `decoded_lossy`), otherwise it
is skipped as non_utf8. Hidden files and folders (.git, .DS_Store) are ignored.

Outputs in --out: documents.jsonl, tokenizer/, train/ and validation/ (the layout of datasets' save_to_disk: Arrow
shards of <= 256 MB, one int32 column `input_ids`, every row exactly block_size long; load_from_disk memory-maps them),
stats.json (with MB/s), config.json. Progress lines give files or documents done, MB, docs/s, MB/s and an ETA.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sqlite3
import time
import zlib
from array import array
from collections import Counter, deque
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
    """MinHash signature of the set of word `shingle`-grams: multiply-shift hashes ((a*x + b) mod 2^64) >> 32.
    A gram's value combines the CRC32s of its words polynomially (mod 2^64) in numpy: one C-level hash per word
    rather than a joined string per gram (15x faster; reading is otherwise bound by this)."""
    words = re.findall(r"\w+", text.lower())
    h = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
    n = max(1, len(h) - shingle + 1)                # fewer words than a shingle: one gram of them all
    g = np.zeros(n, dtype=np.uint64)
    for k in range(min(shingle, len(h))):
        g *= np.uint64(0x100000001B3)
        g += h[k:k + n]
    x = g                       # not np.unique(g): a min over repeated grams is the min over the set (and 30% faster)
    a, b = _hash_params(num_perm)
    a, b = a[:, None], b[:, None]
    # >> 32 is monotone, so the min of the shifted values is the shifted min: shift 128 values, not 128 per gram.
    # One reused (num_perm, 1024) buffer (1 MB, cache-sized) and in-place ufuncs, no temporaries: with the above,
    # 3x faster than the straightforward version (tests/test_build_corpus.py checks it against that).
    sig = np.full(num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    buf = np.empty((num_perm, min(1024, len(x))), dtype=np.uint64)
    for s in range(0, len(x), 1024):
        m = buf[:, :len(x) - s] if len(x) - s < buf.shape[1] else buf
        np.multiply(a, x[s:s + 1024], out=m)
        m += b
        np.minimum(sig, m.min(axis=1), out=sig)
    return sig >> np.uint64(32)


def read_and_sign(path: str, min_chars: int = 0) -> tuple:
    """Worker: read_document, then all the driver needs to decide without touching the text: the documents.jsonl line
    (split "train" until the split is known), the exact-duplicate digest and the MinHash signature.
    Returns (line | None, reason, 16-byte digest, signature, n_chars)."""
    text, reason = read_document(path)
    if text is not None and len(text) < min_chars:
        text, reason = None, f"too_short ({len(text)} < {min_chars} chars)"
    if text is None:
        return None, reason, None, None, 0
    digest = hashlib.sha256(" ".join(text.lower().split()).encode()).digest()
    line = json.dumps({"id": digest.hex()[:16], "source": path, "format": FORMATS[Path(path).suffix.lower()],
                       "n_chars": len(text), "split": "train", "text": text}, ensure_ascii=False) + "\n"
    return line, reason, digest[:16], minhash(text), len(text)


class NearDup:
    """LSH over MinHash signatures (32 bands of 4 rows): candidates are checked by estimated Jaccard.

    The index lives in an SQLite file, not in memory: a signature (512 bytes) and 32 band keys per kept document,
    about 1.5 KB of disk each, while memory stays at SQLite's page cache (cache_kib) whatever the corpus size. Every
    kept document stays a candidate (no cap), so the result is that of an unbounded in-memory index."""

    def __init__(self, threshold: float, path: Path, num_perm: int = 128, bands: int = 32, cache_kib: int = 16384):
        self.threshold, self.bands, self.rows, self.n = threshold, bands, num_perm // bands, 0
        if threshold > 1:
            return
        path.unlink(missing_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{cache_kib}", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE sig (doc INTEGER PRIMARY KEY, v BLOB)")
        self.db.execute("CREATE TABLE band (key INTEGER, doc INTEGER)")
        self.db.execute("CREATE INDEX band_key ON band (key)")
        self.db.execute("BEGIN")

    def is_duplicate(self, sig: np.ndarray) -> bool:
        """True if `sig` is a near duplicate of a document added before; otherwise remember it."""
        if self.threshold > 1:
            return False
        sig = sig.astype(np.uint32)                 # the hashes are >> 32: 32 bits hold them exactly
        keys = [int.from_bytes(hashlib.blake2b(sig[i * self.rows:(i + 1) * self.rows].tobytes(), digest_size=8,
                                               person=i.to_bytes(2, "little")).digest(), "little", signed=True)
                for i in range(self.bands)]
        marks = ",".join("?" * len(keys))
        rows = self.db.execute(f"SELECT v FROM sig WHERE doc IN (SELECT doc FROM band WHERE key IN ({marks}))", keys)
        if any(np.mean(np.frombuffer(v, dtype=np.uint32) == sig) >= self.threshold for (v,) in rows):
            return True
        self.db.execute("INSERT INTO sig VALUES (?, ?)", (self.n, sig.tobytes()))
        self.db.executemany("INSERT INTO band VALUES (?, ?)", [(k, self.n) for k in keys])
        self.n += 1
        if self.n % 10000 == 0:                     # bounded transactions: dirty pages go to the file
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")
        return False

    def close(self) -> None:
        if self.threshold <= 1:
            path = Path(self.db.execute("PRAGMA database_list").fetchone()[2])
            self.db.close()
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int, model_max_length: int = 2048, length: int | None = None):
    """Byte-level BPE with the project's special tokens and ChatML template, as a PreTrainedTokenizerFast.
    `texts` may be any iterable (build_corpus streams them from disk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts) if length is None and hasattr(texts, "__len__") else length)
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


# ------------------------------------------------------------------------------- streamed documents and tokens
# Sizes that bound memory, whatever the corpus size (each is a few MB; see the README's corpus figures)
BATCH_CHARS = 1 << 20           # characters of text in one tokenisation task
FLUSH_TOKENS = 1 << 20          # tokens a BlockWriter holds before it writes whole blocks (4 MB of int32)
SHARD_BYTES = 256 << 20         # bytes of token ids per Arrow shard

_worker: dict = {}              # per process: the documents file and the tokenizer (set by init_tokenize_worker)


def init_tokenize_worker(docs_path: str, backend_json: str, tokenizer_dir: str, parallel: bool) -> None:
    """Open the documents file and load the tokenizer once per process. A tokenizers-backed tokenizer runs as the
    bare `tokenizers` object (40 MB a process; transformers and torch would add 300 MB to each worker)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"   # no threads inside worker processes
    _worker["docs"] = open(docs_path, "rb")
    if backend_json:
        from tokenizers import Tokenizer
        tk = Tokenizer.from_file(backend_json)
        tk.no_truncation()
        tk.no_padding()
        _worker["encode"] = lambda texts: [e.ids for e in tk.encode_batch_fast(texts, add_special_tokens=False)]
    else:                                                   # a pure-Python tokenizer: transformers it is
        tok = load_tokenizer(tokenizer_dir)
        _worker["encode"] = lambda texts: tok(texts, add_special_tokens=False, verbose=False,
                                              return_attention_mask=False)["input_ids"]


def tokenize_spans(spans: list[tuple[int, int]]) -> tuple[list[np.ndarray], int]:
    """Worker: read documents by (byte offset, length) in the documents file; return their token ids and the bytes
    read. The driver sends offsets, not texts, so the text crosses no pipe."""
    fh, texts = _worker["docs"], []
    for offset, length in spans:
        fh.seek(offset)
        texts.append(json.loads(fh.read(length))["text"])
    return [np.asarray(ids, dtype=np.int32) for ids in _worker["encode"](texts)], sum(n for _, n in spans)


def ordered_map(fn, items, pool, window: int):
    """pool.imap with at most `window` tasks in flight: imap would queue every task (and every result of a slow
    consumer) in memory at once."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class BlockWriter:
    """Packs documents (token ids + EOS, concatenated in the order given) into block_size rows, written as it goes
    into Arrow shards in the layout of `datasets`' save_to_disk, which load_from_disk memory-maps. Holds at most
    FLUSH_TOKENS + one document of tokens; the last partial block is dropped."""

    def __init__(self, path: Path, block_size: int, eos: int):
        import datasets
        import pyarrow as pa

        self.pa, self.path, self.block_size, self.eos = pa, path, block_size, np.array([eos], dtype=np.int32)
        self.features = datasets.Features.from_arrow_schema(
            pa.schema([("input_ids", pa.list_(pa.int32(), block_size))]))
        self.shard_blocks = max(1, SHARD_BYTES // (4 * block_size))
        self.pending, self.n_pending, self.tokens, self.blocks, self.documents = [], 0, 0, 0, 0
        self.shards, self.sink, self.in_shard, self.digest = [], None, 0, hashlib.blake2b(digest_size=16)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)

    def add(self, ids: np.ndarray) -> None:
        self.pending += [ids, self.eos]
        self.n_pending += len(ids) + 1
        self.tokens += len(ids) + 1
        self.documents += 1
        if self.n_pending >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        flat = np.concatenate(self.pending)
        n = len(flat) // self.block_size * self.block_size
        rows, self.pending, self.n_pending = flat[:n], [flat[n:]], len(flat) - n
        while len(rows):
            if self.sink is None or self.in_shard == self.shard_blocks:
                self._next_shard()
            take = min(len(rows) // self.block_size, self.shard_blocks - self.in_shard)
            chunk, rows = rows[:take * self.block_size], rows[take * self.block_size:]
            array = self.pa.FixedSizeListArray.from_arrays(self.pa.array(chunk), self.block_size)
            self.sink.write_batch(self.pa.record_batch([array], schema=self.features.arrow_schema))
            self.digest.update(chunk.tobytes())
            self.in_shard, self.blocks = self.in_shard + take, self.blocks + take

    def _next_shard(self) -> None:
        if self.sink is not None:
            self.sink.close()
        self.shards.append(self.path / f"shard-{len(self.shards):05d}.arrow")
        self.sink, self.in_shard = self.pa.ipc.new_stream(str(self.shards[-1]), self.features.arrow_schema), 0

    def close(self) -> dict:
        """Write the rest, name the shards as save_to_disk does, add its state.json and dataset_info.json."""
        import datasets

        if self.pending:
            self._flush()
        if self.sink is not None:
            self.sink.close()
        names = [f"data-{i:05d}-of-{len(self.shards):05d}.arrow" for i in range(len(self.shards))]
        for shard, name in zip(self.shards, names):
            shard.rename(self.path / name)
        datasets.DatasetInfo(features=self.features).write_to_directory(str(self.path))
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": self.digest.hexdigest(),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        (self.path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        return {"documents": self.documents, "tokens": self.tokens, "blocks": self.blocks,
                "dropped_tokens": self.n_pending, "shards": len(names)}


# ---------------------------------------------------------------------------------------------------- driver
def log(msg: str) -> None:
    print(f"[build_corpus] {msg}", flush=True)


class Progress:
    """`what i/n, MB, docs/s, MB/s, ETA` lines every 10 s (and at the end) for the long passes."""

    def __init__(self, what: str, n: int, total_bytes: int):
        self.what, self.n, self.total, self.t0, self.last = what, n, total_bytes, time.time(), time.time()
        self.i = self.bytes = 0

    def update(self, items: int, nbytes: int) -> None:
        self.i, self.bytes = self.i + items, self.bytes + nbytes
        now = time.time()
        if self.i == self.n or now - self.last >= 10:
            el, mb = max(now - self.t0, 1e-9), self.bytes / 1e6
            eta = el / max(self.bytes, 1) * (self.total - self.bytes)
            log(f"{self.what} {self.i}/{self.n}, {mb:.1f}/{self.total / 1e6:.1f} MB, {self.i / el:.0f} docs/s, "
                f"{mb / el:.1f} MB/s, {el:.0f}s elapsed, ETA {eta:.0f}s")
            self.last = now


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
    spawn, window = mp.get_context("spawn"), 2 * cfg.num_workers

    # ---- pass 1: read, clean, deduplicate; kept documents go to disk as they come. In memory per kept document:
    # its 16-byte digest in a set and two int64 (offset, length) — ~100 bytes; the near-duplicate index is on disk.
    docs_tmp = out / ".documents.tmp.jsonl"
    sizes = [f.stat().st_size for f in readable]
    hashes, near, dups = set(), NearDup(cfg.near_dup_threshold, out / ".near_dup.sqlite"), Counter()
    offsets, n_chars = array("q", [0]), array("q")
    progress = Progress("read", len(readable), sum(sizes))
    pool = spawn.Pool(cfg.num_workers) if cfg.num_workers > 1 else None
    read = functools.partial(read_and_sign, min_chars=cfg.min_chars)
    with open(docs_tmp, "wb") as fh:
        results = ordered_map(read, (str(f) for f in readable), pool, 4 * window)
        for path, size, (line, reason, digest, sig, chars) in zip(readable, sizes, results):
            if line is None:
                skipped[reason.split(" ")[0]] += 1
                log(f"skip {path}: {reason}")
            else:
                notes.update([reason] if reason else [])
                if digest in hashes:
                    dups["exact"] += 1
                    log(f"skip {path}: exact duplicate")
                elif near.is_duplicate(sig):
                    dups["near"] += 1
                    log(f"skip {path}: near duplicate (Jaccard >= {cfg.near_dup_threshold})")
                else:
                    hashes.add(digest)
                    offsets.append(offsets[-1] + fh.write(line.encode("utf-8")))
                    n_chars.append(chars)
            progress.update(1, size)
    if pool:
        pool.close()
        pool.join()
    near.close()
    del hashes
    n_docs = len(n_chars)
    if n_docs < 2:
        raise SystemExit(f"corpus too small: {n_docs} usable document(s) in {inputs}; need at least 2 "
                         "(one for train, one for validation)")

    # ---- split by document: a seeded order; validation takes the first docs until it has its share and ~one block
    order = np.random.default_rng(cfg.seed).permutation(n_docs)
    n_val = min(n_docs - 1, max(1, round(cfg.val_fraction * n_docs)))
    chars_in_order = np.cumsum(np.frombuffer(n_chars, dtype=np.int64)[order])
    while n_val < n_docs - 1 and chars_in_order[n_val - 1] < 6 * cfg.block_size:
        n_val += 1
    del chars_in_order

    def texts(indices):
        with open(docs_tmp, "rb") as fh:
            for i in indices:
                fh.seek(offsets[i])
                yield json.loads(fh.read(offsets[i + 1] - offsets[i]))["text"]

    if tok is None:
        log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {n_docs - n_val} train documents, "
            "streamed from disk")
        tok = train_tokenizer(texts(order[n_val:]), cfg.vocab_size, max(2048, cfg.block_size), length=n_docs - n_val)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    tok.save_pretrained(str(out / "tokenizer"))
    eos = tok.eos_token_id
    backend = getattr(tok, "backend_tokenizer", None)
    backend_json = out / ".tokenizer.json"
    if backend is not None:
        backend_json.write_text(backend.to_str())
    init = (str(docs_tmp), str(backend_json) if backend is not None else "", str(out / "tokenizer"),
            cfg.num_workers <= 1)
    pool = spawn.Pool(cfg.num_workers, init_tokenize_worker, init) if cfg.num_workers > 1 else None
    if pool is None:
        init_tokenize_worker(*init)

    # ---- pass 2: tokenise in batches over the worker processes, pack into blocks, write shards as they fill
    def batches(indices):
        """(offset, length) of documents, in the given order, in tasks of about BATCH_CHARS characters."""
        batch, chars = [], 0
        for i in indices:
            batch.append((offsets[i], offsets[i + 1] - offsets[i]))
            chars += n_chars[i]
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    def tokenised(indices, progress: Progress):
        """Token ids of the documents `indices`, in that order."""
        for ids_list, nbytes in ordered_map(tokenize_spans, batches(indices), pool, window):
            progress.update(len(ids_list), nbytes)
            yield from ids_list

    is_val = np.zeros(n_docs, dtype=bool)
    is_val[order[:n_val]] = True
    total_bytes = offsets[-1]
    progress = Progress("tokenised", n_docs, total_bytes)
    val = BlockWriter(out / "validation", cfg.block_size, eos)
    for ids in tokenised(order[:n_val], progress):
        val.add(ids)
    moved = 0                       # token counts known now: make sure validation holds at least one block
    while val.tokens < cfg.block_size and n_val < n_docs - 1:
        for ids in tokenised(order[n_val:n_val + 1], progress):
            val.add(ids)
        is_val[order[n_val]], n_val, moved = True, n_val + 1, moved + 1
    train = BlockWriter(out / "train", cfg.block_size, eos)
    for ids in tokenised(order[n_val:], progress):
        train.add(ids)
    if pool:
        pool.close()
        pool.join()
    if "docs" in _worker:
        _worker.pop("docs").close()
    split_stats = {}
    for split, writer in (("train", train), ("validation", val)):
        split_stats[split] = writer.close()
        if split_stats[split]["blocks"] == 0:
            raise SystemExit(f"corpus too small: the {split} split has {writer.tokens} tokens, fewer than one block "
                             f"of {cfg.block_size}; add documents or lower --block_size")
    chars = {"train": 0, "validation": 0}
    with open(docs_tmp, "rb") as src, open(out / "documents.jsonl", "wb") as dst:   # now with each one's split
        for i, line in enumerate(src):
            split = "validation" if is_val[i] else "train"
            chars[split] += n_chars[i]
            dst.write(line.replace(b'"split": "train"', b'"split": "validation"', 1) if is_val[i] else line)
    for split in chars:
        split_stats[split] = {"documents": split_stats[split]["documents"], "chars": chars[split],
                              **{k: v for k, v in split_stats[split].items() if k != "documents"}}
    docs_tmp.unlink()
    backend_json.unlink(missing_ok=True)

    seconds = time.time() - t_start
    stats = {
        "files_seen": len(files), "documents_kept": n_docs,
        "skipped": {k: v for k, v in sorted(skipped.items()) if v}, "unsupported_extensions": dict(unsupported),
        "duplicates_removed": {"exact": dups["exact"], "near": dups["near"]}, "notes": dict(notes),
        "chars": sum(chars.values()), "tokens": sum(s["tokens"] for s in split_stats.values()),
        "splits": split_stats, "validation_docs_moved_for_one_block": moved, "block_size": cfg.block_size,
        "tokenizer": {"source": cfg.tokenizer or f"byte-level BPE (vocab {cfg.vocab_size}) trained on the train split",
                      "class": type(tok).__name__, "vocab_size": len(tok), "eos_token": tok.eos_token,
                      "eos_token_id": eos},
        "input_mb": round(sum(sizes) / 1e6, 2), "seconds": round(seconds, 2),
        "mb_per_s": round(sum(sizes) / 1e6 / max(seconds, 1e-9), 2),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"kept {n_docs}/{len(files)} files, {stats['chars']} chars, {stats['tokens']} tokens; blocks train "
        f"{split_stats['train']['blocks']} / validation {split_stats['validation']['blocks']}; "
        f"skipped {stats['skipped']}, duplicates {stats['duplicates_removed']}; {stats['seconds']}s "
        f"({stats['mb_per_s']} MB/s of input) -> {out}")
    return stats


if __name__ == "__main__":
    main(load_config(CorpusConfig))
