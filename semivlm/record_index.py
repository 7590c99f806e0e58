"""Multimodal records at any scale: a record index on disk, built once, and images decoded per micro-batch.

* The index: every record's token ids and labels, its images' resolved paths and header sizes (never their pixels),
  length, modality and task, in one Arrow file (a `datasets` table, memory-mapped: the pages are the OS's, shared by
  every rank and worker, and not counted twice). It is built once, with vlm.py's per-record checks (the one-line
  errors, or counts under skip_invalid; overflow) and reused while its inputs are unchanged: the record files (path,
  size, mtime), the tokenizer and processor (vocabulary, chat template, image processor, image token count) and the
  encoding settings all go into its fingerprint, which names its directory. Anything else is built afresh.
* Images: ImageCollate decodes and preprocesses a micro-batch's images (vlm.load_image, the processor) and then runs
  the usual collate; WorkerBatches runs it in DataLoader worker processes, a few micro-batches ahead, over exactly the
  index lists semivlm.loop.StepBatches would use (the loop still decides the order). An image that fails to decode
  there is named in one line (file and record), or with skip_invalid replaced by a blank image with the same token
  count and counted: the batch keeps its shape, so no rank waits on another.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import zlib
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from semivlm import vlm
from semivlm.chat import SkipRecord, named_error
from semivlm.data import RecordError, read_jsonl, record_task

INDEX_VERSION = 1  # bump when what the index holds or how records are encoded changes


# ---------------------------------------------------------------- fingerprint

def _tokenizer_text(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # the whole tokenizer.json: vocabulary, merges, added tokens, normaliser
        return backend.to_str()
    return json.dumps(sorted(tok.get_vocab().items()))


def processor_fingerprint(processor) -> str:
    """What encoding depends on besides the records and settings: tokenizer, chat templates, image processor, the
    processor's image-token arithmetic."""
    tok = processor.tokenizer
    parts = [_tokenizer_text(tok), str(tok.chat_template), str(getattr(processor, "chat_template", None)),
             processor.image_processor.to_json_string(), str(processor.image_token_id),
             str(processor.patch_size), str(processor.num_additional_image_tokens),
             str(processor.vision_feature_select_strategy), str(tok.pad_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def index_fingerprint(files: list[str], processor, settings: dict) -> str:
    """sha256 over the record files (absolute path, size, mtime in ns), the processor and the settings."""
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": INDEX_VERSION, "files": stats, "processor": processor_fingerprint(processor),
                       "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- the table

def _features(pairs: bool):
    from datasets import Features, Sequence, Value

    ids = Sequence(Value("int32"))
    tokens = {f"{side}_{k}": ids for side in ("chosen", "rejected") for k in ("input_ids", "labels")} if pairs else \
        {"input_ids": ids, "labels": ids, "length": Value("int32")}
    return Features({"id": Value("string"), "task": Value("string"), **tokens, "images": Sequence(Value("string")),
                     "image_sizes": Sequence(Sequence(Value("int32"))), "n_images": Value("int32"),
                     "has_image": Value("bool")})


class IndexedRecords(torch.utils.data.Dataset):
    """The rows of a record index seen through an array of row numbers (task repeats take a row several times).
    Items are dicts without pixels ("pixel_values": None; ImageCollate adds them). `add_columns` attaches per-item
    values (DPO's reference log-probs) that the items then carry."""

    def __init__(self, table, rows: np.ndarray | None = None, meta: dict | None = None):
        self.table, self.meta = table, meta or {}
        self.rows = np.arange(len(table), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.extra: dict[str, list] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.table[int(self.rows[i])]
        row["pixel_values"] = None
        for k, v in self.extra.items():
            row[k] = v[i]
        return row

    def column(self, name: str) -> np.ndarray:
        """One column in item order, read from the table without materialising the rows."""
        return self.table.data.column(name).to_numpy(zero_copy_only=False)[self.rows]

    def repeated(self, repeats) -> "IndexedRecords":
        """Each item taken repeats[i] times in a row (as [e for e in items for _ in range(k)] would)."""
        return IndexedRecords(self.table, np.repeat(self.rows, np.asarray(repeats, dtype=np.int64)), self.meta)

    def add_columns(self, columns: dict[str, list]) -> None:
        for k, v in columns.items():
            if len(v) != len(self):
                raise ValueError(f"column {k}: {len(v)} values for {len(self)} items")
            self.extra[k] = list(v)


def build_index(path: Path, rows: Iterable[tuple[dict, Path]], processor, settings: dict, where: str, pairs: bool,
                skip_invalid: bool) -> dict:
    """Encode `rows` ((record, directory its image paths are relative to)) into path/records.arrow, streaming
    (memory bounded by the writer's batch), and write path/meta.json with the counts. Returns the meta."""
    from datasets.arrow_writer import ArrowWriter

    path.mkdir(parents=True, exist_ok=True)
    counts, cache, n_by_root, kept, with_image = Counter(), {}, Counter(), 0, 0
    writer = ArrowWriter(features=_features(pairs), path=str(path / "records.arrow"), writer_batch_size=1000)
    try:
        for rec, root in rows:
            n_by_root[root] += 1
            try:
                if pairs:  # encode_vlm_pair names `where` itself
                    ex = vlm.encode_vlm_pair(processor, rec, root, settings["max_length"], where, settings["overflow"],
                                             settings["max_aspect_ratio"], cache, lazy=True)
                    truncated = False
                else:
                    rid, ex, n_full = vlm._record(processor, rec, n_by_root[root], root, settings["max_length"],
                                                  settings["overflow"], settings["max_aspect_ratio"], cache, lazy=True)
                    ex, truncated = {"id": rid, **ex}, n_full > settings["max_length"]
            except SkipRecord as e:
                counts[f"skipped: {e.reason}"] += 1
                continue
            except RecordError as e:
                if not skip_invalid:
                    raise (e if pairs else named_error(e, where)) from None
                counts[f"invalid: {getattr(e, 'reason', 'invalid')}"] += 1
                continue
            counts["kept"] += 1
            if not pairs:
                counts["truncated"] += bool(truncated)
            ex.pop("pixel_values", None)
            ex.setdefault("images", [])
            ex.setdefault("image_sizes", [])
            ex["task"] = record_task(rec)
            writer.write(ex)
            kept, with_image = kept + 1, with_image + bool(ex["has_image"])
        writer.finalize()
    finally:
        writer.close()
    counts.setdefault("kept", 0)
    if not pairs:
        counts.setdefault("truncated", 0)
    meta = {"where": where, "records": kept, "with_images": with_image, "counts": dict(counts),
            "distinct_images": sum(1 for k in cache if k is not None), "settings": settings, "version": INDEX_VERSION}
    (path / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return meta


def load_index(path: Path) -> IndexedRecords:
    from datasets import Dataset

    return IndexedRecords(Dataset.from_file(str(path / "records.arrow"), in_memory=False),
                          meta=json.loads((path / "meta.json").read_text()))


def open_index(where: str, files: list[str], rows: Callable[[], Iterable[tuple[dict, Path]]], processor,
               settings: dict, index_dir: str | Path, is_main: bool = True, barrier: Callable = lambda: None,
               log: Callable = print, pairs: bool = False, skip_invalid: bool = False) -> IndexedRecords:
    """The index of `where` (train, held-out …) for these record files, processor and settings: reused from
    index_dir/<where>-<fingerprint> when it exists, else built there by the main process (the others wait at
    `barrier`) from `rows()`. An index of the same `where` with another fingerprint is stale and removed."""
    settings = {**settings, "pairs": pairs, "skip_invalid": skip_invalid}
    fp = index_fingerprint(files, processor, settings)
    index_dir = Path(index_dir)
    path = index_dir / f"{where.replace(' ', '_')}-{fp[:20]}"
    if is_main and not (path / "meta.json").is_file():
        for stale in index_dir.glob(f"{where.replace(' ', '_')}-*"):
            shutil.rmtree(stale, ignore_errors=True)
            log(f"{where}: removed the record index {stale.name} (built from other inputs or settings)")
        tmp = index_dir / f".tmp-{path.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        import time

        t0 = time.perf_counter()
        meta = build_index(tmp, rows(), processor, settings, where, pairs, skip_invalid)
        tmp.rename(path)
        log(f"{where}: built the record index {path} in {time.perf_counter() - t0:.1f}s "
            f"({meta['distinct_images']} distinct images, headers read, not decoded)")
        reused = False
    else:
        reused = True
    barrier()
    index = load_index(path)
    meta = index.meta
    log(f"{where}: {meta['records']} {'pairs' if pairs else 'samples'} ({meta['with_images']} with images) | "
        f"{meta['counts']}{' | record index reused: ' + str(path) if reused else ''}")
    return index


# ---------------------------------------------------------------- images per micro-batch

class ImageCollate:
    """`collate(rows)` after each row's images are decoded and preprocessed (rows from IndexedRecords carry paths).

    In a DataLoader worker an image that does not decode is replaced by a blank one of the same token count and
    listed in the batch's `_bad_images`; `report(batch)`, in the main process, then raises the one-line RecordError
    (naming file and record) or, with skip_invalid, counts and logs it. Called in the main process (held-out
    evaluation), it reports at once."""

    def __init__(self, collate: Callable, processor, max_aspect_ratio: float = 5.0, skip_invalid: bool = False,
                 where: str = "train", log: Callable = print, cache_mb: float = 0):
        self.collate, self.processor, self.max_aspect_ratio = collate, processor, max_aspect_ratio
        self.skip_invalid, self.where, self.log = skip_invalid, where, log
        self.fill, self.blank = vlm.image_fill(processor), vlm.blank_pixel_values(processor)
        self.replaced = 0
        self.cache_mb, self.cache, self.cached_bytes = cache_mb, {}, 0

    def __getstate__(self) -> dict:  # a DataLoader worker starts with an empty cache of its own, not a pickled copy
        return {**self.__dict__, "cache": {}, "cached_bytes": 0}

    def pixels(self, row: dict, bad: list) -> torch.Tensor:
        out = []
        for p in row["images"]:
            if (hit := self.cache.get(p)) is not None:
                out.append(hit)
                continue
            try:
                image = vlm.load_image(p, row["id"], self.max_aspect_ratio, self.fill)
                out.append(self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"])
            except RecordError as e:
                bad.append(str(e))
                out.append(self.blank)
                continue
            # many epochs over few images (the vision stage): decoding would cost as much as the step; the first
            # cache_mb of preprocessed images stay, so memory is bounded whatever the number of images
            if self.cached_bytes + (size := out[-1].nbytes) <= self.cache_mb * 2 ** 20:
                self.cache[p], self.cached_bytes = out[-1], self.cached_bytes + size
        return torch.cat(out)

    def __call__(self, rows: list[dict]) -> dict:
        bad: list[str] = []
        rows = [{**r, "pixel_values": self.pixels(r, bad)} if r.get("images") else r for r in rows]
        batch = self.collate(rows)
        batch["_bad_images"] = bad
        return batch if torch.utils.data.get_worker_info() is not None else self.report(batch)

    def report(self, batch: dict) -> dict:
        for message in batch.pop("_bad_images", None) or []:
            if not self.skip_invalid:
                raise RecordError(f"{self.where}: {message}")
            self.replaced += 1
            self.log(f"{self.where}: {message}: replaced by a blank image (skip_invalid; {self.replaced} so far)")
        return batch


class _IndexLists(torch.utils.data.Sampler):
    """The micro-batches' index lists of StepBatches from `start` on: DataLoader's batch_sampler."""

    def __init__(self, steps, start: int):
        self.steps, self.start = steps, start

    def __iter__(self):
        return (idx for s in itertools.count(self.start) for idx in self.steps.indices(s))


class WorkerBatches:
    """StepBatches whose micro-batches are collated by `num_workers` DataLoader processes, `prefetch` micro-batches
    each ahead of the step that needs them; same index lists, same order. Pinned memory on GPU. A call for another
    step than the next (the loop never does this, a test may) restarts the workers there."""

    def __init__(self, steps, num_workers: int, report: Callable[[dict], dict], pin_memory: bool = False,
                 prefetch: int = 4):
        self.steps, self.num_workers, self.report = steps, num_workers, report
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self._it, self._next = None, None

    def _start(self, step: int) -> None:
        self._it = None  # the old workers shut down
        loader = torch.utils.data.DataLoader(self.steps.dataset, batch_sampler=_IndexLists(self.steps, step),
                                             collate_fn=self.steps.collate, num_workers=self.num_workers,
                                             prefetch_factor=self.prefetch, pin_memory=self.pin_memory)
        self._it = iter(loader)

    def __call__(self, step: int) -> list[dict]:
        if self._it is None or step != self._next:
            self._start(step)
        window = [self.report(next(self._it)) for _ in range(self.steps.cfg.grad_accum)]
        self._next = step + 1
        return window


def batch_loader(num_workers: int, report: Callable[[dict], dict], pin_memory: bool = False, prefetch: int = 4):
    """For semivlm.loop.train(batch_loader=…): wrap its StepBatches in WorkerBatches (none when num_workers is 0:
    the main process collates, and `report` still checks each batch)."""
    def wrap(steps):
        if num_workers <= 0:
            return lambda step: [report(b) for b in steps(step)]
        return WorkerBatches(steps, num_workers, report, pin_memory, prefetch)
    return wrap


# ---------------------------------------------------------------- the records a training run reads
# cfg: a training config with skip_invalid, objective, record_fraction, seed, max_length, overflow, max_aspect_ratio,
# index_dir, output_dir, task_repeats (train_moe.MoEConfig)

def iter_records(cfg, files: list[str], split: str, tasks: tuple[str, ...]):
    """(record, directory its image paths are relative to) for the records of `split` whose task is in `tasks`, one
    at a time. A record without meta.task is "instruction" when it has no image, else "vqa"."""
    for path in files:
        try:
            for r in read_jsonl(path, skip_bad=cfg.skip_invalid):
                task = record_task(r)
                if (not split or r.get("meta", {}).get("split", split) == split) and (cfg.objective == "dpo" or task in tasks):
                    if cfg.record_fraction >= 1 or kept_share(r.get("id") or json.dumps(r, sort_keys=True),
                                                              cfg.seed) < cfg.record_fraction:
                        yield r, Path(path).parent
        except RecordError as e:
            raise SystemExit(str(e)) from None


def kept_share(record_id, seed: int) -> float:
    """A record's place in [0, 1), from its id and the seed alone: a record_fraction keeps the same records in every
    run, on every rank, whatever the file order."""
    return zlib.crc32(f"{seed}:{record_id}".encode()) / 2 ** 32


def read_records(cfg, files: list[str], split: str, tasks: tuple[str, ...]) -> list[tuple[dict, Path]]:
    return list(iter_records(cfg, files, split, tasks))


def index_records(cfg, processor, files: list[str], split: str, tasks: tuple[str, ...], where: str,
                  accelerator) -> IndexedRecords:
    """The records of `split` and `tasks` in `files`, encoded and checked once into a memory-mapped record index
    (reused while files, processor and settings are unchanged); no pixels until a micro-batch needs them."""
    for f in files:
        if not Path(f).is_file():
            raise SystemExit(f"{f}: file does not exist")
    settings = {"split": split, "tasks": sorted(tasks), "objective": cfg.objective, "max_length": cfg.max_length,
                "overflow": cfg.overflow, "max_aspect_ratio": cfg.max_aspect_ratio,
                **({"record_fraction": cfg.record_fraction} if cfg.record_fraction < 1 else {})}
    return open_index(where, files, partial(iter_records, cfg, files, split, tasks), processor, settings,
                      cfg.index_dir or Path(cfg.output_dir) / "record_index", accelerator.is_main_process,
                      accelerator.wait_for_everyone, accelerator.print, pairs=cfg.objective == "dpo",
                      skip_invalid=cfg.skip_invalid)


def repeat_tasks(cfg, examples: IndexedRecords, tasks: tuple[str, ...], log) -> IndexedRecords:
    """The data mix's weights: each example of a task in cfg.task_repeats taken that many times (encoded once);
    `tasks` are all the tasks there are."""
    if unknown := set(cfg.task_repeats) - set(tasks):
        raise SystemExit(f"task_repeats: unknown task(s) {sorted(unknown)}; tasks are {', '.join(tasks)}")
    if not cfg.task_repeats:
        return examples
    out = examples.repeated([int(cfg.task_repeats.get(t, 1)) for t in examples.column("task")])
    log(f"train: {len(examples)} samples -> {len(out)} with task repeats {cfg.task_repeats}")
    return out
