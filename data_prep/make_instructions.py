"""Text instruction-response pairs from the corpus (SemiKong's principles, worked calculations, process control and
defect diagnosis) and preference pairs for DPO.

    python data_prep/make_instructions.py --documents runs/demo/corpus/documents.jsonl --annotations runs/demo/annotations --out runs/demo/instructions
    python data_prep/make_instructions.py --teacher openai --base_url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --documents /data/corpus/documents.jsonl --out /data/instructions --concurrency 32
    srun -N1 -c 8 python data_prep/make_instructions.py --teacher openai --base_url http://$VLLM_HOST:8000/v1 --model meta-llama/Llama-3.1-70B-Instruct --documents /data/corpus/documents.jsonl --out /data/instructions

Input: documents.jsonl of data_prep/build_corpus.py, cut into chunks of whole paragraphs under one heading. Teachers:
`builtin` (default; offline, deterministic per chunk id): "explain" (a heading's paragraphs), definitions and cloze
questions from "X is Y" sentences and glossary entries, failure modes from bold-led bullets, worked calculations with
answers computed here (Rayleigh k1·λ/NA, depth of focus k2·λ/NA², Deal–Grove oxide, implant dose from current × time,
CMP Preston scaling, sheet resistance ρ/t); `openai` (data_prep/teacher.py, prompt <prompts_dir>/instructions.txt,
answers cached on disk: a rerun after a kill repeats no request).

Outputs in --out: instructions.jsonl (text_record; meta: task=instruction, kind = principle | calculation |
process_control | defect_diagnosis, generator, source = chunk id, doc_id, split = the document's split, teacher;
calculations add values, answer, answer_unit), preferences.jsonl ({"id", "images", "prompt", "chosen", "rejected",
"meta"}: chosen = an instruction response, or a micrograph annotation from --annotations (annotate.py's output);
rejected = the same answer with one fact corrupted: number, unit, category, defect, yes/no or direction),
failures.jsonl (openai: chunks that failed), stats.json, config.json.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data_prep.captions import DEFECT_NAMES, PHRASES
from data_prep.teacher import (INSTRUCTION_KINDS, FatalTeacherError, InstructionSet, TeacherConfig, TeacherError,
                               read_prompt, redact, render)
from semivlm.config import ConfigError, load_config, save_config
from semivlm.data import CATEGORIES, RecordError, read_jsonl, text_record, write_jsonl_atomic

Q_E = 1.602176634e-19                   # elementary charge, C
UNITS = {"nm": "µm", "µm": "nm", "mA": "µA", "µA": "mA", "Ω/sq": "kΩ/sq", "s": "min", "min": "s", "h": "min"}
ANTONYMS = [("increase", "decrease"), ("higher", "lower"), ("larger", "smaller"), ("faster", "slower"),
            ("thicker", "thinner"), ("more", "less"), ("above", "below"), ("before", "after"), ("wider", "narrower")]


@dataclass
class InstructionsConfig(TeacherConfig):
    teacher: str = "builtin"            # builtin | openai
    documents: str = ""                 # documents.jsonl from data_prep/build_corpus.py
    annotations: str = ""               # annotate.py output directory: image preference pairs from its records
    out: str = ""
    temperature: float = 0.7            # varied pairs from one chunk (annotation wants 0.2: facts)
    max_tokens: int = 2048              # several pairs per answer
    pairs_per_chunk: int = 4            # openai: pairs asked per chunk
    max_chunk_chars: int = 1500
    min_chunk_chars: int = 200
    seed: int = 0
    preference_model: str = ""          # a causal-LM directory: its own answers become `rejected` in text pairs
    skip_invalid: bool = False


def log(msg: str) -> None:
    print(f"[make_instructions] {redact(msg)}", flush=True)


# ------------------------------------------------------------------------------------------------------ chunks
def chunk_document(doc: dict, max_chars: int, min_chars: int) -> list[dict]:
    """Whole paragraphs under one heading, up to max_chars; short tails merge into the previous chunk."""
    chunks, heading, title, cur = [], "", "", []

    def flush():
        text = "\n\n".join(cur).strip()
        if text and chunks and len(text) < min_chars and chunks[-1]["heading"] == heading:
            chunks[-1]["text"] += "\n\n" + text
        elif text and len(text) >= min(min_chars, 80):
            chunks.append({"id": f"{doc['id']}-c{len(chunks):03d}", "doc_id": doc["id"], "source": doc["source"],
                           "split": doc["split"], "title": title, "heading": heading, "text": text})
        cur.clear()

    for para in re.split(r"\n\s*\n", doc["text"]):
        para = para.strip()
        if m := re.match(r"^(#{1,6})\s+(.+)$", para):
            flush()
            heading = m.group(2).strip()
            title = title or heading
            continue
        if cur and sum(map(len, cur)) + len(para) > max_chars:
            flush()
        if para:
            cur.append(para)
    flush()
    return chunks


# ------------------------------------------------------------------------------------------ worked calculations
def _sci(x: float) -> str:
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa} × 10^{int(exp)}"


def calc_rayleigh(rng):
    lam, na = rng.choice([(193.0, 1.35), (193.0, 0.93), (248.0, 0.8), (13.5, 0.33), (13.5, 0.55), (365.0, 0.6)])
    k1 = rng.choice([0.28, 0.3, 0.35, 0.4, 0.45, 0.5])
    r = k1 * lam / na
    return ({"k1": k1, "wavelength_nm": lam, "NA": na}, r, "nm",
            f"A scanner uses λ = {lam:g} nm with NA = {na:g}. With a process factor k1 = {k1:g}, what half-pitch "
            "resolution does the Rayleigh criterion give, and what pitch does that allow in one exposure?",
            f"R = k1 · λ / NA = {k1:g} × {lam:g} nm / {na:g} = {r:.1f} nm half-pitch, so the minimum pitch in a "
            f"single exposure is about {2 * r:.1f} nm.")


def calc_dof(rng):
    lam, na = rng.choice([(193.0, 1.35), (248.0, 0.8), (13.5, 0.33), (13.5, 0.55)])
    k2 = rng.choice([0.5, 0.6, 0.8, 1.0])
    dof = k2 * lam / na ** 2
    return ({"k2": k2, "wavelength_nm": lam, "NA": na}, dof, "nm",
            f"Estimate the depth of focus for λ = {lam:g} nm, NA = {na:g} and k2 = {k2:g}.",
            f"DOF = k2 · λ / NA² = {k2:g} × {lam:g} nm / {na:g}² = {dof:.1f} nm. Topography and focus errors must "
            "stay well inside this budget.")


def calc_deal_grove(rng):
    ambient, a_um, b_um2h, tau_h = rng.choice([("dry O2", 0.165, 0.0117, 0.37), ("wet (H2O)", 0.226, 0.287, 0.0)])
    t = rng.choice([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    x_um = a_um / 2 * (math.sqrt(1 + (t + tau_h) / (a_um ** 2 / (4 * b_um2h))) - 1)
    return ({"A_um": a_um, "B_um2_per_h": b_um2h, "tau_h": tau_h, "t_h": t}, x_um * 1000, "nm",
            f"Silicon is oxidised in {ambient} at 1000 °C for {t:g} h. Using the Deal–Grove model with A = {a_um:g} µm, "
            f"B = {b_um2h:g} µm²/h and τ = {tau_h:g} h, how thick is the oxide?",
            f"Deal–Grove: x² + A·x = B·(t + τ), so x = (A/2)·(√(1 + (t + τ)/(A²/4B)) − 1). Here A²/4B = "
            f"{a_um ** 2 / (4 * b_um2h):.4f} h and t + τ = {t + tau_h:g} h, giving x = {x_um:.4f} µm ≈ "
            f"{x_um * 1000:.0f} nm of oxide.")


def calc_implant_dose(rng):
    i_ma, t_s, diam_mm = rng.choice([0.5, 1.0, 2.0, 5.0, 10.0]), rng.choice([10.0, 20.0, 30.0, 60.0]), 300.0
    area = math.pi * (diam_mm / 20) ** 2
    dose = i_ma * 1e-3 * t_s / (Q_E * area)
    return ({"current_mA": i_ma, "time_s": t_s, "area_cm2": round(area, 2)}, dose, "cm^-2",
            f"A singly charged ion beam of {i_ma:g} mA is scanned uniformly over a {diam_mm:.0f} mm wafer for "
            f"{t_s:g} s. What dose does the wafer receive?",
            f"Dose Q = I · t / (q · A). The wafer area is π × (15 cm)² = {area:.1f} cm², so Q = {i_ma * 1e-3:g} A × "
            f"{t_s:g} s / (1.602 × 10^-19 C × {area:.1f} cm²) = {_sci(dose)} cm^-2.")


def calc_preston(rng):
    rr1, p1, v1 = rng.choice([150.0, 200.0, 300.0, 400.0]), rng.choice([14.0, 20.0, 28.0]), rng.choice([0.8, 1.0])
    p2, v2, over = p1 * rng.choice([0.5, 1.5, 2.0]), v1 * rng.choice([1.0, 1.25, 1.5]), rng.choice([300.0, 500.0])
    rr2 = rr1 * (p2 / p1) * (v2 / v1)
    return ({"rr1_nm_min": rr1, "p1_kPa": p1, "v1_m_s": v1, "p2_kPa": p2, "v2_m_s": v2, "overburden_nm": over}, rr2,
            "nm/min", f"A CMP step removes {rr1:g} nm/min at {p1:g} kPa and {v1:g} m/s. Following Preston's equation, "
            f"what removal rate do you expect at {p2:g} kPa and {v2:g} m/s, and how long does it take to clear "
            f"{over:g} nm of overburden?",
            f"Preston: RR = Kp · P · V, so RR scales with P·V: RR2 = {rr1:g} × ({p2:g}/{p1:g}) × ({v2:g}/{v1:g}) = "
            f"{rr2:.1f} nm/min. Clearing {over:g} nm then takes {over / rr2:.2f} min, before any overpolish.")


def calc_sheet_resistance(rng):
    metal, rho = rng.choice([("copper", 1.7), ("aluminium", 2.7), ("tungsten", 5.6), ("TiN", 25.0)])
    t_nm = rng.choice([20.0, 50.0, 100.0, 200.0, 500.0])
    rs = rho * 1e-6 / (t_nm * 1e-7)
    return ({"rho_uohm_cm": rho, "thickness_nm": t_nm}, rs, "Ω/sq",
            f"What is the sheet resistance of a {t_nm:g} nm {metal} film with resistivity {rho:g} µΩ·cm?",
            f"Rs = ρ / t = {rho:g} × 10^-6 Ω·cm / ({t_nm:g} × 10^-7 cm) = {rs:.3g} Ω/sq.")


CALCS = {"rayleigh": (calc_rayleigh, r"resolution|numerical aperture|\bk1\b|Rayleigh"),
         "depth_of_focus": (calc_dof, r"depth of focus"),
         "deal_grove": (calc_deal_grove, r"Deal|oxidation|thermal oxide"),
         "implant_dose": (calc_implant_dose, r"implant|\bdose\b"),
         "preston": (calc_preston, r"Preston|removal rate|\bCMP\b"),
         "sheet_resistance": (calc_sheet_resistance, r"sheet resistance|resistivity")}


# --------------------------------------------------------------------------------------------- built-in teacher
def lower(s: str) -> str:
    """Lower case, except acronyms (COP, SEM, HKMG, CMP keep their capitals)."""
    return " ".join(w if sum(c.isupper() for c in w) > 1 else w.lower() for w in s.split())


def builtin_pairs(chunk: dict, rng: random.Random) -> list[tuple[str, str, str, str, dict]]:
    """(kind, generator, prompt, response, extra meta) for one chunk."""
    topic = re.sub(r"^[\d.\s]+|[*_`]", "", chunk["heading"] or chunk["title"]).strip()
    low = lower(topic)
    pairs, text = [], chunk["text"]
    body = re.sub(r"\*\*", "", text)
    kind = ("defect_diagnosis" if re.search(r"failure|defect|contamina|problem|excursion|yield", low) else
            "process_control" if re.search(r"control|monitor|metrology|inspection|spc|profil", low) else None)
    context = re.sub(r"\b(failure modes?|defects?|problems?)( and \w+ \w+)?( of| in)?\b", "", low).strip(" ,:") or \
        lower(chunk["title"])
    if topic and not text.startswith(("**", "- ", "|")) and len(text) >= 200:
        pairs.append((kind or "principle", "explain", rng.choice({
            "defect_diagnosis": [f"How do you recognise and diagnose {low}?", f"Explain {low} and their causes.",
                                 f"What should an engineer check when facing {low}?"],
            "process_control": [f"How is {low} used to keep the process under control?",
                                f"Explain {low} from a process-control point of view.",
                                f"What does a process engineer monitor in {low}, and why?"]}.get(kind, [
            f"Explain {low} in semiconductor manufacturing.", f"What should a process engineer know about {low}?",
            f"Summarise the key points of {low}.", f"Describe {low} as an expert would to a new engineer."])), body, {}))
    defs = [(m.group(1), m.group(2).strip()) for m in re.finditer(
        r"^\*\*([^*]{2,60}?)\.?\*\*\s+(.{20,400}?)(?=\n\n|\Z)", text, re.S | re.M) if not text.startswith("- ")]
    sentences = re.findall(r"(?:^|(?<=[.!?]\s))([A-Z][^.!?\n]{15,250}\.)", body.replace("\n", " "))
    for s in sentences:
        if m := re.match(r"^(?:The |An? )?([A-Za-z][\w\-–/ ()]{1,50}?) (?:is|are) (?:an?|the) (.{10,200})\.$", s):
            if m.group(1).split()[0] not in ("It", "This", "That", "There", "These", "Those", "Each", "One"):
                defs.append((m.group(1), s))
    for term, definition in defs[:2]:
        short = re.sub(r"\s*\(.*\)$", "", term).strip()
        pairs.append(("principle", "definition", rng.choice([f"What is {short}?", f"Define {short}.",
                                                            f"In one or two sentences, what does {short} mean?"]),
                      definition if definition.startswith(short) else f"{term}: {definition}", {"term": short}))
    if defs and (s := next((d for t, d in defs if d.startswith(t) and len(t) > 3), None)):
        term = next(t for t, d in defs if d == s)
        pairs.append(("principle", "cloze", f"Fill in the blank: \"{s.replace(term, '____', 1)}\"", term,
                      {"term": term}))
    for name, desc in re.findall(r"^- \*\*([^*]{2,60}?)\.?\*\*\.?\s+(.{20,500}?)(?=\n- |\Z)", text, re.S | re.M)[:3]:
        desc = " ".join(desc.split())
        if kind == "defect_diagnosis":
            prompt = rng.choice([f"In {context}, an engineer suspects {lower(name)}. What is it and how does it "
                                 "show up?", f"What causes {lower(name)} ({context}), and what are its signatures?"])
        elif kind == "process_control":
            prompt = rng.choice([f"How is {lower(name)} used to keep {low} under control?",
                                 f"What role does {lower(name)} play in {low}?"])
        else:
            prompt = rng.choice([f"In {low}, what is the role of {lower(name)}?", f"Describe {lower(name)}."])
        pairs.append((kind or "principle", "bullet", prompt, f"{name}: {desc}", {"term": name}))
    matched = [k for k, (_, pattern) in CALCS.items() if re.search(pattern, text, re.I)]
    if matched:
        name = rng.choice(matched)
        values, answer, unit, prompt, response = CALCS[name][0](rng)
        pairs.append(("calculation", f"calc_{name}", prompt, response,
                      {"values": values, "answer": float(answer), "answer_unit": unit}))
    return pairs


# ------------------------------------------------------------------------------------------------- corruption
def _wrong_number(s: str, rng: random.Random) -> str:
    v = float(s)
    for _ in range(10):
        w = v * rng.choice([0.5, 2.0, 3.0, 0.3, 1.5, 10.0]) if v else float(rng.randint(1, 9))
        decimals = len(s.split(".")[1]) if "." in s else 0
        out = f"{w:.{decimals}f}" if decimals else str(int(round(w)))
        if out != s:
            return out
    return s + "1"


IMAGE_FACTS = ["number", "unit", "category", "defect", "polarity", "direction"]
TEXT_FACTS = ["number", "unit", "direction"]


def corrupt(text: str, rng: random.Random, prefer: list[str], fallback: list[str] = IMAGE_FACTS,
            last_number: float = 0.6) -> tuple[str, str] | None:
    """The text with one fact changed, tried in the order of `prefer` then `fallback`; (new text, what) or None.
    A number is the last one in the text with probability `last_number` (the result of a calculation)."""
    for how in prefer + fallback:
        if how == "number" and (nums := list(re.finditer(r"(?<![\w.^-])\d+(?:\.\d+)?(?![\w^.]|\.\d)", text))):
            m = nums[-1] if rng.random() < last_number else rng.choice(nums)
            return text[:m.start()] + _wrong_number(m.group(), rng) + text[m.end():], "number"
        if how == "unit" and (m := re.search(r"(?<=\d )(" + "|".join(map(re.escape, UNITS)) + r")(?![\w/])", text)):
            return text[:m.start()] + UNITS[m.group()] + text[m.end():], "unit"
        if how == "category" and (hits := [(c, p) for c, p in PHRASES.items() if p in text]):
            cat, phrase = max(hits, key=lambda h: len(h[1]))
            other = rng.choice([p for c, p in PHRASES.items() if c != cat and p not in phrase])
            return text.replace(phrase, other, 1), "category"
        if how == "defect":
            names = [n for n, _ in DEFECT_NAMES.values()]
            if hit := next((n for n in names if n in text), None):
                return text.replace(hit, rng.choice([n for n in names if n != hit]), 1), "defect"
            if re.search(r"[Nn]o defects|defect-free|no visible defects", text):
                return f"Yes: one {rng.choice(names)} is visible.", "defect"
        if how == "polarity" and re.match(r"(Yes|No)\b", text):
            return ("No" if text.startswith("Yes") else "Yes") + text[2 if text.startswith("No") else 3:], "polarity"
        if how == "direction":
            for a, b in ANTONYMS:
                if m := re.search(rf"\b({a}|{b})\b", text):
                    return text[:m.start()] + (b if m.group() == a else a) + text[m.end():], "direction"
    return None


def preference_pairs(instructions: list[dict], annotations: str, out: Path, seed: int,
                     model_answers: dict[str, str] | None = None) -> list[dict]:
    """Text pairs from the instructions, image pairs from annotate.py's records (ground truth) in `annotations`.
    `rejected` is a model's own answer where one was given and differs from the reference, else one corrupted fact."""
    by_type = {"category": ["category"], "defect": ["defect"], "yes_no": ["polarity"], "size": ["number", "unit"],
               "pitch": ["number", "unit"], None: ["number", "category"]}
    sources = [(r, None) for r in instructions]
    for name in ("captions", "vqa", "classify") if annotations else ():
        if not (Path(annotations) / f"{name}.jsonl").is_file():
            raise ConfigError(f"--annotations {annotations}: {name}.jsonl not found (run data_prep/annotate.py first)")
        sources += [(r, Path(annotations)) for r in read_jsonl(Path(annotations) / f"{name}.jsonl")]
    prefs = []
    for rec, ann in sources:
        rng, meta = random.Random(f"{seed}:{rec['id']}:pref"), rec["meta"]
        prompt = " ".join(p["text"] for p in rec["messages"][0]["content"] if p["type"] == "text")
        chosen = rec["messages"][1]["content"][0]["text"]
        own = (model_answers or {}).get(rec["id"], "")
        if ann is None and own and " ".join(own.lower().split()) != " ".join(chosen.lower().split()):
            bad = (own, "model_answer")
        elif ann is None:
            calc = meta["kind"] == "calculation"
            bad = corrupt(chosen, rng, ["number"] if calc else ["number", "direction"], TEXT_FACTS, 1.0 if calc else .5)
        elif meta["task"] == "classify":
            bad = (CATEGORIES[rng.choice([c for c in CATEGORIES if c != meta["label"]])], "category")
        else:
            bad = corrupt(chosen, rng, by_type.get(meta.get("question_type"), ["number"]))
        if bad and bad[0] != chosen:
            images = [os.path.relpath(os.path.abspath(ann / p), os.path.abspath(out)) for p in rec["images"]]
            prefs.append({"id": f"{rec['id']}.pref", "images": images, "prompt": prompt, "chosen": chosen,
                          "rejected": bad[0], "meta": {"corruption": bad[1], "kind": meta.get("kind", meta["task"]),
                                                       "source": rec["id"], "split": meta["split"]}})
    return prefs


# ------------------------------------------------------------------------------------------------------ driver
async def teacher_pairs(cfg: InstructionsConfig, chunks: list[dict], out: Path, failures: list) -> list[tuple]:
    template = read_prompt(cfg.prompts_dir, "instructions")
    teacher = cfg.openai_teacher(out, cfg.seed, log)
    log(f"teacher openai: model {cfg.model} at {teacher.base_url}")

    async def one(chunk):
        user = render(template, "instructions", {"chunk": chunk["text"], "source": chunk["source"],
                                                 "n_pairs": cfg.pairs_per_chunk, "kinds": ", ".join(INSTRUCTION_KINDS)})
        try:
            answer, _ = await teacher.ask("", user, None, InstructionSet)
            return [(p.kind, "teacher", p.instruction, p.response, {}) for p in answer.pairs]
        except TeacherError as e:
            failures.append({"chunk_id": chunk["id"], "reason": e.reason, "attempts": e.attempts})
            return []
    try:
        return await asyncio.gather(*(one(c) for c in chunks))
    finally:
        await teacher.close()


def main(cfg: InstructionsConfig) -> dict:
    if cfg.teacher not in ("builtin", "openai"):
        raise ConfigError(f"unknown teacher '{cfg.teacher}'; choose one of builtin, openai")
    if not cfg.documents or not cfg.out:
        raise ConfigError("--documents (documents.jsonl from build_corpus.py) and --out are required")
    t0, out, counts = time.time(), Path(cfg.out), Counter()
    docs = list(read_jsonl(cfg.documents, skip_bad=cfg.skip_invalid, counts=counts))
    for i, d in enumerate(docs, 1):
        if not all(k in d for k in ("id", "text", "split", "source")):
            raise RecordError(f"{cfg.documents}: row {i}: missing one of id, text, split, source")
    chunks = [c for d in docs for c in chunk_document(d, cfg.max_chunk_chars, cfg.min_chunk_chars)]
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    log(f"{len(docs)} documents -> {len(chunks)} chunks; teacher {cfg.teacher}")
    failures: list[dict] = []
    if cfg.teacher == "builtin":
        generated = [builtin_pairs(c, random.Random(f"{cfg.seed}:{c['id']}")) for c in chunks]
    else:
        try:
            generated = asyncio.run(teacher_pairs(cfg, chunks, out, failures))
        except FatalTeacherError as e:
            raise SystemExit(str(e)) from None
    records, seen = [], set()
    for chunk, pairs in zip(chunks, generated):
        for k, (kind, gen, prompt, response, extra) in enumerate(pairs):
            if (prompt, response) in seen:
                continue
            seen.add((prompt, response))
            meta = {"task": "instruction", "kind": kind, "generator": gen, "source": chunk["id"],
                    "doc_id": chunk["doc_id"], "split": chunk["split"], "teacher": cfg.teacher, **extra}
            records.append(text_record(f"{chunk['id']}.{k:02d}", prompt, response, meta))
    answers = None
    if cfg.preference_model:  # image pairs keep fact corruptions: answering them needs the VLM of later stages
        from semivlm.model import generate_text

        log(f"answering {len(records)} instructions with {cfg.preference_model} for rejected text answers")
        prompts = [" ".join(p["text"] for p in r["messages"][0]["content"] if p["type"] == "text") for r in records]
        answers = dict(zip((r["id"] for r in records), generate_text(cfg.preference_model, prompts)))
    prefs = preference_pairs(records, cfg.annotations, out, cfg.seed, answers)
    write_jsonl_atomic(out / "instructions.jsonl", records)
    write_jsonl_atomic(out / "preferences.jsonl", prefs)
    write_jsonl_atomic(out / "failures.jsonl", failures)
    stats = {"teacher": cfg.teacher, "documents": len(docs), "chunks": len(chunks), "instructions": len(records),
             "kinds": dict(Counter(r["meta"]["kind"] for r in records)),
             "generators": dict(Counter(r["meta"]["generator"] for r in records)),
             "splits": dict(Counter(r["meta"]["split"] for r in records)), "preferences": len(prefs),
             "preference_corruptions": dict(Counter(p["meta"]["corruption"] for p in prefs)),
             "image_preferences": sum(1 for p in prefs if p["images"]), "failed_chunks": len(failures),
             "skipped_documents": {k: v for k, v in counts.items() if v}, "seconds": round(time.time() - t0, 2)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    log(f"{len(records)} instructions {stats['kinds']}, {len(prefs)} preference pairs "
        f"({stats['image_preferences']} with images), {len(failures)} failed chunks -> {out}")
    return stats


if __name__ == "__main__":
    main(load_config(InstructionsConfig))
