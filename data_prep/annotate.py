"""Annotate micrographs: captions, VQA pairs and class labels from a teacher, as multimodal JSONL records.

    python data_prep/annotate.py --manifest runs/demo/micrographs/manifest.jsonl --out runs/demo/annotations
    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000 &   # then, with any OpenAI-compatible server:
    python data_prep/annotate.py --teacher openai --base_url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct --manifest /data/sem/manifest.jsonl --out /data/sem/annotations --concurrency 32
    srun -N1 -c 8 --time=12:00:00 python data_prep/annotate.py --teacher openai --base_url http://$VLLM_HOST:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct --manifest /data/sem/manifest.jsonl --out /data/sem/annotations --concurrency 64

Teachers: `metadata` (default; offline, deterministic per image id: varied captions and questions written from the
ground truth of synthetic images, see data_prep/captions.py), `openai` (any OpenAI-compatible endpoint; the key only from
OPENAI_API_KEY; prompts from --prompts_dir; data_prep/teacher.py has the retry, cache and schema policy) and
`transformers` (a local VLM directory as --model). Teacher answers are checked against the ground truth and metadata
(category, count, size, pitch, orientation, coverage, defects, modality); contradicting answers are dropped and
counted per check.

Outputs in --out (image paths relative to it): captions.jsonl, vqa.jsonl, classify.jsonl (semivlm.data.image_record;
meta: task, image_id, split, teacher, + question_type for VQA, label for classify), failures.jsonl (one entry per image
that could not be annotated, with the reason), stats.json, config.json, cache/ (openai answers). Output is append-only:
each finished image appends its records, the classify record last; a rerun repairs a line cut by a kill, drops records
of an image cut midway, and skips images already done (records or failure entry; --retry_failures redoes failures).
stats.json (replaced atomically at the end of each run, and when a fatal teacher error stops one) holds the last run's
own figures at the top level (annotated, failed and why, validation checked/dropped per check, retries per cause,
requests, cache hits, records/s), `totals` and `question_types` of the output files as they now are, and `all_runs`:
the same counts summed over every run into this directory (a rerun that completes the missing images keeps the first
run's drops and retries), with `runs` counting them.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.captions import describe_image, parse_lengths_nm
from data_prep.teacher import (QUESTION_TYPES, FatalTeacherError, ImageAnnotation, TeacherConfig, TeacherError,
                               read_prompt, redact, render, repair_jsonl)
from semivlm.config import ConfigError, load_config, save_config
from semivlm.data import CATEGORIES, RecordError, append_jsonl, fmt_length, image_record, read_jsonl, write_jsonl_atomic

TEACHERS = ("metadata", "openai", "transformers")
OUTPUTS = ("captions", "vqa", "classify", "failures")
CLASSIFY_PROMPTS = ["Which category does this micrograph belong to? Choose one of: {opts}.",
                    "Classify this electron micrograph. Options: {opts}.",
                    "What type of sample is shown? Answer with one of: {opts}.",
                    "Assign this image to one class ({opts})."]
CAPTION_PROMPTS = ["Describe this micrograph.", "Write a short caption for this image.",
                   "Describe the morphology and scale of what is shown.", "What does this electron micrograph show?",
                   "Give a concise technical description of this image, with sizes.",
                   "Summarise this SEM/TEM image for a lab notebook."]


@dataclass
class AnnotateConfig(TeacherConfig):
    teacher: str = "metadata"           # metadata | openai | transformers
    manifest: str = ""                  # micrograph manifest JSONL (docs/manifest.md)
    out: str = ""                       # output directory
    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"])
    vqa_per_image: int = 6
    seed: int = 0
    skip_invalid: bool = False          # skip and count bad manifest lines instead of stopping
    retry_failures: bool = False        # redo images that have a failure entry
    limit: int = 0                      # annotate at most this many images (0 = all)
    size_tolerance: float = 0.3         # validation: relative error allowed on sizes, pitches
    count_tolerance: float = 0.3        # validation: relative error allowed on counts
    angle_tolerance_deg: float = 15.0
    coverage_tolerance: float = 0.1     # absolute, on the 0..1 fraction


def log(msg: str) -> None:
    print(f"[annotate] {redact(msg)}", flush=True)


# ------------------------------------------------------------------------------------------------------ inputs
def load_manifest(cfg: AnnotateConfig, counts: Counter) -> list[dict]:
    path = Path(cfg.manifest)
    rows, seen = [], set()
    for i, row in enumerate(read_jsonl(path, skip_bad=cfg.skip_invalid, counts=counts), 1):
        missing = [k for k in ("id", "path", "split", "modality") if k not in row]
        if missing or (row.get("id") in seen):
            problem = f"missing keys {missing}" if missing else f"duplicate id '{row['id']}'"
            if not cfg.skip_invalid:
                raise RecordError(f"{path}: row {i} ({row.get('id', 'no id')}): {problem}")
            counts["bad_row"] += 1
            continue
        seen.add(row["id"])
        if row["split"] in cfg.splits:
            rows.append({**row, "abs_path": (path.parent / row["path"]).resolve()})
    return rows[:cfg.limit] if cfg.limit > 0 else rows


def prompt_values(item: dict, cfg: AnnotateConfig) -> dict:
    px = item.get("pixel_size_nm")
    w, h = item.get("width") or 0, item.get("height") or 0
    return {"modality": item["modality"], "width": w, "height": h, "categories": ", ".join(CATEGORIES),
            "pixel_size_nm": f"{px:g}" if px else "unknown (do not state absolute sizes)",
            "field_of_view": f"{fmt_length(w * px)} x {fmt_length(h * px)}" if px and w and h else "unknown",
            "instrument": json.dumps(item.get("instrument") or {}, ensure_ascii=False)[:500],
            "n_questions": cfg.vqa_per_image, "question_types": ", ".join(QUESTION_TYPES)}


def image_png(item: dict) -> bytes:
    """The image as PNG bytes (re-encoded if the file is another format); TeacherError naming the file if it is
    missing or does not decode."""
    import io

    from PIL import Image

    p = item["abs_path"]
    if not p.is_file():
        raise TeacherError(f"image file not found: {p}")
    data = p.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if data[:8] == b"\x89PNG\r\n\x1a\n":
                return data
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
    except Exception as e:
        raise TeacherError(f"image does not decode: {p} ({type(e).__name__}: {str(e)[:100]})") from None


# -------------------------------------------------------------------------------------------------- validation
NUM = r"(\d+(?:\.\d+)?)"
NEGATED_DEFECT = re.compile(r"\b(no|without|free of|absent|none|not)\b[^.]{0,40}\b(defects?|anomal\w*)|defect-free"
                            r"|\bno visible\b|\bintact\b", re.I)
FOV_QUESTION = re.compile(r"field of view|imaged area|how (wide|large) is the (image|area|field)|image width", re.I)
DEFECT_WORDS = re.compile(r"defect|bridg|missing (line|feature|contact)|contaminat|crack|foreign particle", re.I)


def claims_defect(text: str) -> bool | None:
    if NEGATED_DEFECT.search(text):
        return False
    return True if DEFECT_WORDS.search(text) else None


CATEGORY_WORDS = {k: re.compile(p, re.I) for k, p in {
    "biological": r"\bbiolog|\bcells?\b", "fibres": r"\bfib(re|er)s?\b", "films_coated_surface": r"\bfilms?\b|\bcoat",
    "mems_devices_electrodes": r"\bmems\b|\belectrode", "nanowires": r"nanowire", "particles": r"particles?\b",
    "patterned_surface": r"\bpattern|\bgrating|line-and-space", "porous_sponge": r"\bporous|\bsponge|\bpores?\b",
    "powder": r"\bpowder", "tips": r"\btips?\b"}.items()}


def mentioned_categories(text: str) -> set[str]:
    return {k for k, pattern in CATEGORY_WORDS.items() if pattern.search(text)}


def check_answer(text: str, qtype: str | None, question: str, item: dict, cfg: AnnotateConfig) -> dict[str, bool]:
    """Checks that apply to one teacher answer (caption when qtype is None): check name -> passed."""
    gt, res = item.get("ground_truth") or {}, {}
    mod, other = item["modality"].upper(), {"SEM": "TEM", "TEM": "SEM"}.get(item["modality"].upper())
    if other and re.search(rf"\b{other}\b", text) and not re.search(rf"\b{mod}\b", text):
        res["modality"] = False
    elif re.search(r"\b(SEM|TEM)\b", text):
        res["modality"] = True
    if not gt:
        return res
    named = mentioned_categories(text)
    if named and qtype in (None, "category"):
        res["category"] = gt["category"] in named
    near = lambda v, ref, tol: ref is not None and abs(v - ref) <= tol * max(abs(ref), 1e-9)  # noqa: E731
    if qtype == "counting" and gt.get("object_count") is not None:
        nums = [float(x) for x in re.findall(r"\b\d+\b", text)]
        res["count"] = bool(nums) and near(nums[0], gt["object_count"], cfg.count_tolerance)
    if qtype in ("size", "pitch") and (lengths := parse_lengths_nm(text)):
        refs = [gt.get(k) for k in (("pitch_nm", "line_width_nm") if qtype == "pitch" else
                                    ("size_mean_nm", "pitch_nm", "line_width_nm"))]
        if qtype == "size" and item.get("pixel_size_nm") and FOV_QUESTION.search(question):
            refs = [(item.get(k) or 0) * item["pixel_size_nm"] for k in ("width", "height")]    # the field of view
        res[qtype] = any(near(v, r, cfg.size_tolerance) for v in lengths for r in refs)
    if qtype == "orientation" and gt.get("orientation_deg") is not None:
        angles = [float(a) for a in re.findall(NUM + r"\s*(?:°|deg)", text)]
        diff = [abs((a - gt["orientation_deg"] + 90) % 180 - 90) for a in angles]
        res["orientation"] = bool(diff) and min(diff) <= cfg.angle_tolerance_deg
    if qtype == "coverage" and (pct := re.findall(NUM + r"\s*(?:%|percent)", text)):
        refs = [v for v in (gt.get("coverage"), gt.get("porosity")) if v is not None]
        res["coverage"] = any(abs(float(p) / 100 - r) <= cfg.coverage_tolerance for p in pct for r in refs)
    generic_defect_q = qtype == "yes_no" and "defect" in question.lower()
    if qtype in (None, "defect") or generic_defect_q:
        claim = text.strip().lower().startswith("yes") if generic_defect_q else claims_defect(text)
        if claim is not None:
            res["defect"] = claim == bool(gt.get("defects"))
    return res


# ------------------------------------------------------------------------------------------------- annotation
def build_records(item: dict, ann: dict, cfg: AnnotateConfig, out: Path, rng: random.Random) -> dict[str, list]:
    rel = os.path.relpath(item["abs_path"], out)
    base = {"image_id": item["id"], "split": item["split"], "teacher": cfg.teacher, "modality": item["modality"]}
    recs = {"captions": [], "vqa": [], "classify": []}
    if ann.get("caption"):
        meta = {**base, "task": "caption", **ann.get("caption_meta", {})}
        recs["captions"].append(image_record(f"{item['id']}.caption", rel, rng.choice(CAPTION_PROMPTS),
                                             ann["caption"], meta))
    for k, qa in enumerate(ann["qa"]):
        meta = {**base, "task": "vqa", "question_type": qa["question_type"], **qa.get("meta", {})}
        recs["vqa"].append(image_record(f"{item['id']}.vqa{k:02d}", rel, qa["question"], qa["answer"], meta))
    label = ann.get("label")
    if label:
        opts = ", ".join(CATEGORIES.values())
        recs["classify"].append(image_record(f"{item['id']}.classify", rel, rng.choice(CLASSIFY_PROMPTS).format(
            opts=opts), CATEGORIES[label], {**base, "task": "classify", "label": label,
                                            "label_source": ann["label_source"]}))
    return recs


async def annotate_item(item: dict, cfg: AnnotateConfig, teacher, prompts: dict, checks: Counter) -> dict:
    """The annotation of one image: {"caption", "qa": [...], "label", "label_source"}; TeacherError if none."""
    gt = item.get("ground_truth")
    png = image_png(item)                               # every teacher: the file must exist and decode
    if teacher is None:                                 # metadata teacher
        if not gt:
            raise TeacherError("no ground truth for metadata teacher")
        return describe_image(item, cfg.vqa_per_image, random.Random(f"{cfg.seed}:{item['id']}"))
    values = prompt_values(item, cfg)
    user = render(prompts["caption"], "caption", values) + "\n\n" + render(prompts["vqa"], "vqa", values)
    answer, info = await teacher.ask(prompts["system"], user, png, ImageAnnotation)
    ann = {"caption": answer.caption, "qa": [], "label": None, "label_source": "teacher", "attempts": info["attempts"]}
    for qtype, question, text in [(None, "", answer.caption)] + [(q.question_type, q.question, q.answer)
                                                                 for q in answer.qa]:
        res = check_answer(text, qtype, question, item, cfg)
        for name, ok in res.items():
            checks[f"{name}.checked"] += 1
            checks[f"{name}.dropped"] += not ok
        if all(res.values()):
            if qtype is not None:
                ann["qa"].append({"question": question, "answer": text, "question_type": qtype})
        elif qtype is None:
            ann["caption"] = None
    checks["category_field.checked"] += bool(gt)
    if gt:
        checks["category_field.dropped"] += answer.category != gt["category"]
        ann["label"], ann["label_source"] = gt["category"], "ground_truth"
    else:
        ann["label"] = answer.category
    return ann


def resume(out: Path, retry_failures: bool, counts: Counter) -> set[str]:
    """Repair the outputs after a kill and return the image ids already done (classify record or failure entry).
    Streams the files: memory holds ids, not records."""
    path = {n: out / f"{n}.jsonl" for n in OUTPUTS}
    for name in OUTPUTS:
        counts["repaired_lines"] += repair_jsonl(path[name])
    ids = lambda n, get: [get(r) for r in read_jsonl(path[n])] if path[n].is_file() else []  # noqa: E731
    done = set(ids("classify", lambda r: r["meta"]["image_id"]))
    failed = ids("failures", lambda r: r["image_id"])
    if retry_failures and failed:
        counts["failures_retried"], failed = len(failed), []
        write_jsonl_atomic(path["failures"], [])
    done |= set(failed)
    for n in ("captions", "vqa"):                       # an image cut midway: its records go, the image is redone
        partial = sum(i not in done for i in ids(n, lambda r: r["meta"]["image_id"]))
        if partial:
            counts["partial_records_dropped"] += partial
            write_jsonl_atomic(path[n], (r for r in read_jsonl(path[n]) if r["meta"]["image_id"] in done))
    return done


def make_teacher(cfg: AnnotateConfig, out: Path):
    if cfg.teacher == "metadata":
        return None
    if cfg.teacher == "transformers":
        from data_prep.teacher import TransformersTeacher
        return TransformersTeacher(cfg.model, cfg.max_tokens, cfg.temperature, cfg.max_retries, cfg.seed, log)
    return cfg.openai_teacher(out, cfg.seed, log)


async def run(cfg: AnnotateConfig, todo: list[dict], out: Path, counts: Counter, checks: Counter) -> None:
    prompts = {n: read_prompt(cfg.prompts_dir, n) for n in ("system", "caption", "vqa")} \
        if cfg.teacher != "metadata" else {}
    teacher = make_teacher(cfg, out)
    if teacher is not None:
        log(f"teacher {cfg.teacher}: model {cfg.model} at {getattr(teacher, 'base_url', cfg.model)}")
    files = {n: open(out / f"{n}.jsonl", "a", encoding="utf-8") for n in OUTPUTS}
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    t0, done = time.time(), [0]

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            try:
                ann = await annotate_item(item, cfg, teacher, prompts, checks)
                recs = build_records(item, ann, cfg, out, random.Random(f"{cfg.seed}:{item['id']}:prompts"))
                for name in ("captions", "vqa", "classify"):        # classify last: it marks the image done
                    for rec in recs[name]:
                        append_jsonl(files[name], rec)
                        counts[f"records.{name}"] += 1
                counts["annotated"] += 1
            except TeacherError as e:
                append_jsonl(files["failures"], {"image_id": item["id"], "path": str(item["path"]),
                                                 "split": item["split"], "teacher": cfg.teacher,
                                                 "reason": e.reason, "attempts": e.attempts})
                counts["failed"] += 1
                counts[f"failure.{e.reason.split(':')[0][:60]}"] += 1
            done[0] += 1
            if done[0] % max(1, len(todo) // 10) == 0 or done[0] == len(todo):
                el = time.time() - t0
                log(f"{done[0]}/{len(todo)} images, {el:.1f}s, ETA {el / done[0] * (len(todo) - done[0]):.0f}s")

    n_workers = 1 if teacher is None or cfg.teacher == "transformers" else max(1, cfg.concurrency)
    tasks = [asyncio.create_task(worker()) for _ in range(n_workers)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:                               # a fatal teacher error: stop the others before closing files
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        for f in files.values():
            f.close()
        if teacher is not None:
            counts.update({"teacher_requests": teacher.requests, "cache_hits": teacher.cache_hits})
            counts.update({f"retry.{k}": v for k, v in teacher.retries.items()})
            await teacher.close()


def main(cfg: AnnotateConfig) -> dict:
    if cfg.teacher not in TEACHERS:
        raise ConfigError(f"unknown teacher '{cfg.teacher}'; choose one of {', '.join(TEACHERS)}")
    if not cfg.out or not cfg.manifest:
        raise ConfigError("--manifest and --out are required")
    t_start, counts, checks = time.time(), Counter(), Counter()
    items = load_manifest(cfg, counts)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    done = resume(out, cfg.retry_failures, counts)
    todo = [it for it in items if it["id"] not in done]
    log(f"{len(items)} images in splits {cfg.splits}; {len(items) - len(todo)} already done; annotating {len(todo)} "
        f"with the {cfg.teacher} teacher")
    fatal = None
    try:
        asyncio.run(run(cfg, todo, out, counts, checks))
    except FatalTeacherError as e:
        fatal = e
    stats = write_stats(cfg, out, items, todo, counts, checks, time.time() - t_start)
    if fatal is not None:
        raise SystemExit(str(fatal)) from None
    log(f"done: {counts['annotated']} annotated, {counts['failed']} failed, {stats['records_this_run']} records "
        f"({stats['records_per_s']}/s); totals {stats['totals']} -> {out}"
        + ("; failures.jsonl has the reasons (--retry_failures true redoes them)" if stats["totals"]["failures"] else ""))
    return stats


def run_totals(stats: dict) -> dict:
    """One run's figures in the shape of `all_runs`."""
    return {"runs": 1, "annotated": stats["annotated"], "failed": stats["failed"],
            "failure_reasons": stats["failure_reasons"], "records": stats["records_this_run"],
            "validation": stats["validation"], "retries": stats["retries"],
            "teacher_requests": stats["teacher_requests"], "cache_hits": stats["cache_hits"],
            "seconds": stats["seconds"]}


def add_totals(a: dict, b: dict) -> dict:
    """Counts summed key by key, nested dicts too; `rate` is not a count (recomputed from the sums)."""
    out = {}
    for k in sorted(a.keys() | b.keys()):
        if k == "rate":
            continue
        x, y = a.get(k), b.get(k)
        out[k] = add_totals(x or {}, y or {}) if isinstance(x, dict) or isinstance(y, dict) else \
            round((x or 0) + (y or 0), 2)
    return out


def previous_totals(path: Path) -> dict:
    """`all_runs` of the stats.json an earlier run left (a stats.json from before `all_runs` counts as one run)."""
    if not path.is_file():
        return {}
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
        return prev["all_runs"] if "all_runs" in prev else run_totals(prev)
    except (ValueError, KeyError, TypeError) as e:
        log(f"warning: {path} is not an earlier run's statistics ({type(e).__name__}: {e}); the totals over all runs "
            "start again from this run")
        return {}


def write_stats(cfg: AnnotateConfig, out: Path, items: list, todo: list, counts: Counter, checks: Counter,
                seconds: float) -> dict:
    totals = {n: sum(1 for _ in read_jsonl(out / f"{n}.jsonl")) for n in OUTPUTS}
    qtypes = Counter(r["meta"]["question_type"] for r in read_jsonl(out / "vqa.jsonl"))
    validation = {k.split(".")[0]: {"checked": checks[k], "dropped": checks[k.replace("checked", "dropped")],
                                    "rate": round(checks[k.replace("checked", "dropped")] / max(checks[k], 1), 4)}
                  for k in sorted(checks) if k.endswith(".checked")}
    new_records = sum(v for k, v in counts.items() if k.startswith("records."))
    stats = {"teacher": cfg.teacher, "images_selected": len(items), "already_done": len(items) - len(todo),
             "annotated": counts["annotated"], "failed": counts["failed"],
             "failure_reasons": {k[8:]: v for k, v in counts.items() if k.startswith("failure.")},
             "records_this_run": new_records, "records_per_s": round(new_records / max(seconds, 1e-9), 2),
             "totals": totals, "question_types": dict(qtypes), "validation": validation,
             "manifest_skipped": {k: counts[k] for k in ("bad_json", "bad_row") if counts[k]},
             "repaired_lines": counts["repaired_lines"], "partial_records_dropped": counts["partial_records_dropped"],
             "teacher_requests": counts["teacher_requests"], "cache_hits": counts["cache_hits"],
             "retries": {k[6:]: v for k, v in counts.items() if k.startswith("retry.")},
             "seconds": round(seconds, 2)}
    all_runs = add_totals(previous_totals(out / "stats.json"), run_totals(stats))
    for v in all_runs["validation"].values():
        v["rate"] = round(v["dropped"] / max(v["checked"], 1), 4)
    stats["all_runs"] = all_runs
    tmp = out / "stats.json.tmp"                        # a kill while writing leaves the previous totals intact
    tmp.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "stats.json")
    for name, v in validation.items():
        log(f"validation {name}: dropped {v['dropped']}/{v['checked']} ({100 * v['rate']:.1f}%)")
    if all_runs["runs"] > 1:
        log(f"all {all_runs['runs']} runs into {out}: {all_runs['annotated']} annotated, {all_runs['failed']} failed, "
            f"retries {all_runs['retries']}")
    return stats


if __name__ == "__main__":
    main(load_config(AnnotateConfig))
