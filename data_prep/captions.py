"""The offline `metadata` teacher: captions and question-answer pairs written from the ground truth of synthetic
micrographs (docs/manifest.md), seeded per image id, with many paraphrases per sentence so that a small model cannot
memorise one string. Used by data_prep/annotate.py (and its validation pass) and data_prep/make_instructions.py.
"""
from __future__ import annotations

import math
import random
import re

from semivlm.data import CATEGORIES, fmt_length

# Captions and question-answer pairs written from the ground truth of synthetic images (docs/manifest.md), seeded per
# image id. Many paraphrases per sentence so that a small model cannot memorise one string.
NOUNS = {  # category -> (plural, singular, size word)
    "biological": ("cells", "cell", "diameter"), "fibres": ("fibres", "fibre", "diameter"),
    "films_coated_surface": ("grains", "grain", "size"),
    "mems_devices_electrodes": ("electrode features", "electrode feature", "width"),
    "nanowires": ("nanowires", "nanowire", "diameter"), "particles": ("particles", "particle", "diameter"),
    "patterned_surface": ("lines", "line", "width"), "porous_sponge": ("pores", "pore", "diameter"),
    "powder": ("powder grains", "powder grain", "size"), "tips": ("tips", "tip", "apex diameter")}
MORPHOLOGY = {
    "biological": ["rounded cells on a flat support", "a cluster of soft, rounded biological cells",
                   "cells with smooth, slightly irregular outlines"],
    "fibres": ["a tangled mat of long fibres", "overlapping fibres crossing the field", "a random network of fibres"],
    "films_coated_surface": ["a continuous film with a fine granular texture", "a coated surface made of small grains",
                             "a polycrystalline film surface"],
    "mems_devices_electrodes": ["a microfabricated electrode structure", "interdigitated electrode features",
                                "a MEMS structure with sharp, straight edges"],
    "nanowires": ["a forest of thin nanowires", "elongated nanowires lying on the substrate",
                  "high-aspect-ratio nanowires"],
    "particles": ["roughly spherical particles scattered over a smooth substrate", "dispersed, near-spherical particles",
                  "isolated and touching round particles"],
    "patterned_surface": ["a periodic line-and-space pattern", "a lithographically patterned grating",
                          "parallel patterned lines"],
    "porous_sponge": ["a sponge-like porous network", "an open porous structure", "a porous material with connected "
                      "voids"],
    "powder": ["an agglomerated powder of irregular grains", "loose powder grains with angular shapes",
               "a powder sample of irregular particles"],
    "tips": ["sharp conical tips", "an array of pointed tips", "tapered tips with fine apexes"]}
DEFECT_NAMES = {"line_bridging": ("line bridge", "a bridge between adjacent lines"),
                "missing_feature": ("missing feature", "a missing feature"),
                "contamination_particle": ("contamination particle", "a contamination particle"),
                "crack": ("crack", "a crack")}
PHRASES = {"biological": "a biological sample", "fibres": "fibres", "films_coated_surface": "a film or coated surface",
           "mems_devices_electrodes": "a MEMS device or electrode", "nanowires": "nanowires",
           "particles": "particles", "patterned_surface": "a patterned surface", "porous_sponge": "a porous sponge",
           "powder": "a powder", "tips": "tips"}
MODALITY_LONG = {"SEM": "scanning electron microscopy", "TEM": "transmission electron microscopy"}
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LENGTH_RE = re.compile(r"(\d+(?:[.,]\d+)?)\s*(nm|µm|μm|um|microns?|Å)\b", re.I)



def parse_lengths_nm(text: str) -> list[float]:
    """Every length written in the text, in nm (µm, um, microns and Å converted)."""
    scale = {"nm": 1.0, "µm": 1000.0, "μm": 1000.0, "um": 1000.0, "micron": 1000.0, "microns": 1000.0, "å": 0.1}
    return [float(v.replace(",", ".")) * scale[u.lower()] for v, u in LENGTH_RE.findall(text)]


def _nice(x: float) -> float:
    """A round threshold near x (1, 2, 2.5, 5 x 10^k)."""
    e = 10 ** math.floor(math.log10(max(x, 1e-9)))
    return min((m * e for m in (1, 2, 2.5, 5, 10)), key=lambda v: abs(v - x))


def _where(defect: dict, w: int, h: int) -> str:
    col = ["left", "centre", "right"][min(2, int(3 * defect.get("x_px", w / 2) / max(w, 1)))]
    row = ["upper", "middle", "lower"][min(2, int(3 * defect.get("y_px", h / 2) / max(h, 1)))]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def _count(n: int, singular: str, plural: str) -> str:
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {singular if n == 1 else plural}"


def _defect_phrase(defects: list, w: int, h: int) -> str:
    by_type: dict[str, list] = {}
    for d in defects:
        by_type.setdefault(d["type"], []).append(_where(d, w, h))
    parts = []
    for t, places in by_type.items():
        name = DEFECT_NAMES.get(t, (t.replace("_", " "),))[0]
        plural = name + ("es" if name.endswith(("sh", "ch")) else "s")
        parts.append(f"{_count(len(places), name, plural)} ({', '.join(dict.fromkeys(places))})")
    return " and ".join(parts)


def describe_image(item: dict, n_vqa: int, rng: random.Random) -> dict:
    """Caption, `n_vqa` question-answer pairs and the label of one synthetic image, from its ground truth."""
    gt, mod = item["ground_truth"], item["modality"].upper()
    cat = gt["category"]
    plural, singular, size_word = NOUNS.get(cat, ("features", "feature", "size"))
    name, morph = PHRASES.get(cat, cat), rng.choice(MORPHOLOGY.get(cat, ["the sample surface"]))
    w, h, px = item.get("width") or 0, item.get("height") or 0, item.get("pixel_size_nm")
    if box := (item.get("provenance") or {}).get("data_bar_box"):      # [x0, y0, x1, y1] of a bar below the image
        h = box[1]
    n, size, std = gt.get("object_count"), gt.get("size_mean_nm"), gt.get("size_std_nm")
    defects, imaging = gt.get("defects") or [], gt.get("imaging") or {}
    fov = f"{fmt_length(w * px)} x {fmt_length(h * px)}" if px and w and h else None
    article = "An" if mod[0] in "AEFHILMNORSX" else "A"
    tid = []

    def pick(key: str, options: list[str]) -> str:
        i = rng.randrange(len(options))
        tid.append(f"{key}{i}")
        return options[i]

    sentences = [pick("o", [f"{article} {mod} micrograph of {name}: {morph}.", f"This {mod} image shows {morph}.",
                            f"{MODALITY_LONG.get(mod, mod).capitalize()} reveals {morph}.",
                            f"The micrograph ({mod}) captures {morph}.", f"Shown here, imaged by {mod}: {morph}.",
                            f"{mod} view of {name}, showing {morph}.",
                            f"{morph[0].upper() + morph[1:]}, recorded with {MODALITY_LONG.get(mod, mod)}.",
                            f"{name[0].upper() + name[1:]} under the {'scanning' if mod == 'SEM' else 'transmission'} "
                            f"electron microscope: {morph}."] + ([f"A {fov} field of {morph} ({mod})."] if fov else []))]
    if size is not None:
        sz, sd = fmt_length(size), fmt_length(std) if std else None
        spread = f" ± {sd}" if sd else ""
        cnt = f"{n} {plural}" if n is not None else f"The {plural}"
        sentences.append(pick("s", [
            f"{cnt} are visible, with a mean {size_word} of about {sz}{spread}.",
            f"The {plural} measure roughly {sz} in {size_word}" + (f" (standard deviation {sd})." if sd else "."),
            f"Typical {singular} {size_word}: {sz}{spread}" + (f"; {n} {plural} in the field." if n else "."),
            f"Their {size_word} averages {sz}" + (f", and {n} of them can be counted." if n else "."),
            (f"Counting gives {n} {plural}" if n else f"The {plural} are distinct") + f", each about {sz} across.",
            f"Mean {size_word} is close to {sz}{spread}" + (f" over {n} {plural}." if n else ".")]))
    elif n is not None:
        sentences.append(pick("s", [f"{n} {plural} can be counted.", f"The field holds {n} {plural}."]))
    if gt.get("pitch_nm"):
        lw = f", with a line width of about {fmt_length(gt['line_width_nm'])}" if gt.get("line_width_nm") else ""
        sentences.append(pick("p", [f"The pattern repeats with a pitch of {fmt_length(gt['pitch_nm'])}{lw}.",
                                    f"The period is {fmt_length(gt['pitch_nm'])}{lw}."]))
    if gt.get("orientation_deg") is not None:
        a = gt["orientation_deg"]
        desc = "nearly horizontal" if a < 15 or a > 165 else "nearly vertical" if 75 <= a <= 105 else "diagonal"
        sentences.append(pick("a", [f"The {plural} are {desc}, at about {a:.0f}° from the horizontal.",
                                    f"Their dominant orientation is {a:.0f}° ({desc}).",
                                    f"Most {plural} are aligned at roughly {a:.0f}° to the image x-axis."]))
    if gt.get("porosity") is not None and cat != "porous_sponge":     # pinholes in a film
        sentences.append(pick("c", ["The film is dense, with no significant pinholes.", "The film looks dense."]
                              if gt["porosity"] < 0.005 else
                              [f"Pinholes take up about {100 * gt['porosity']:.0f}% of the film area.",
                               f"The film has a porosity of roughly {100 * gt['porosity']:.0f}%."]))
    elif gt.get("porosity") is not None:
        sentences.append(pick("c", [f"The porosity is about {100 * gt['porosity']:.0f}%.",
                                    f"Pores take up roughly {100 * gt['porosity']:.0f}% of the area."]))
    elif gt.get("coverage") is not None:
        sentences.append(pick("c", [f"They cover about {100 * gt['coverage']:.0f}% of the field of view.",
                                    f"Area coverage is roughly {100 * gt['coverage']:.0f}%.",
                                    f"About {100 * gt['coverage']:.0f}% of the surface is occupied by {plural}."]))
    if defects:
        dp = _defect_phrase(defects, w, h)
        sentences.append(pick("d", [f"Defects: {dp}.", f"The image contains {dp}.", f"Inspection reveals {dp}.",
                                    f"Notable defects include {dp}."]))
    else:
        sentences.append(pick("d", ["No defects are visible.", "The structure appears defect-free.",
                                    f"No defects are visible among the {plural}.", "There are no visible defects."]))
    notes = [t for t, on in (("noticeable noise", imaging.get("noise_sigma", 0) > 0.08),
                             ("charging contrast", imaging.get("charging", 0) > 0.3),
                             ("slight defocus blur", imaging.get("defocus_px", 0) > 1.5),
                             ("an instrument data bar at the bottom", imaging.get("data_bar"))) if on]
    if notes:
        listed = notes[0] if len(notes) == 1 else ", ".join(notes[:-1]) + " and " + notes[-1]
        sentences.append(pick("i", [f"Imaging shows {listed}.", f"Note {listed}."]))
    if px:
        sentences.append(pick("x", ["", f"Pixel size {px:g} nm.", f"Scale: {px:g} nm per pixel"
                                    + (f", a field of view of {fov}." if fov else ".")]))
    body = sentences[1:]
    if len(body) > 2 and rng.random() < 0.3 and not body[0].startswith(("Their", "They")):   # vary the order a little
        body[0], body[1] = body[1], body[0]
        tid.append("r")
    caption = " ".join(s for s in [sentences[0]] + body if s)

    # ---- question-answer pairs: one generator per question type, each with paraphrases
    def qa(qtype, fact, q, a, number=None, label=None):
        return {"question": q, "answer": a, "question_type": qtype,
                "meta": {"fact": fact, "answer_number": None if number is None else float(number),
                         "answer_label": label}}

    def yes_no():
        options = [lambda: (mod == "TEM", "Is this a TEM image?",
                            f"{'Yes' if mod == 'TEM' else 'No'}, it is {article.lower()} {mod} micrograph.", "modality"),
                   lambda: (mod == "SEM", "Was this image taken with a scanning electron microscope?",
                            f"{'Yes' if mod == 'SEM' else 'No'}, it is {article.lower()} {mod} micrograph.", "modality")]
        other = rng.choice([c for c in CATEGORIES if c != cat])
        shown = rng.random() < 0.5
        options.append(lambda: (shown, f"Does this image show {PHRASES.get(cat if shown else other)}?",
                                f"Yes, it shows {name}." if shown else f"No, it shows {name}.", "category"))
        if size is not None:
            thr = _nice(size * rng.choice([0.5, 0.6, 1.6, 2.0]))
            big = size > thr
            options.append(lambda: (big, f"Are the {plural} larger than {fmt_length(thr)} in {size_word}?",
                                    f"{'Yes' if big else 'No'}, their mean {size_word} is about {fmt_length(size)}.",
                                    "size_mean_nm"))
        if n:
            k = max(1, round(n * rng.choice([0.5, 1.6])))
            options.append(lambda: (n > k, f"Are there more than {k} {plural} in the image?",
                                    f"{'Yes' if n > k else 'No'}, there are {n}.", "object_count"))
        t = rng.choice(sorted(DEFECT_NAMES))
        has = any(d["type"] == t for d in defects)
        options.append(lambda: (has, f"Is there {DEFECT_NAMES[t][1]} in the image?",
                                f"Yes, {DEFECT_NAMES[t][1]} is visible." if has else
                                f"No, there is no {DEFECT_NAMES[t][0]}.", "defects"))
        ans, q, a, fact = options[rng.randrange(len(options))]()
        return qa("yes_no", fact, q, a, label="yes" if ans else "no")

    gens = {"category": lambda: qa("category", "category", rng.choice([
                "What kind of sample is shown?", "What type of material or structure is this?",
                "Which category best describes this micrograph?"]), rng.choice([
                f"The image shows {name}.", f"Category: {CATEGORIES.get(cat, cat)}.",
                f"{name[0].upper() + name[1:]}, imaged by {mod}.", f"It shows {name}: {morph}."]),
                label=cat),
            "defect": lambda: qa("defect", "defects", rng.choice([
                "Are there any defects? If so, what kind and where?", "Do you see any defects in this image?",
                "Describe any defects visible in the micrograph."]),
                (f"Yes: {_defect_phrase(defects, w, h)}." if defects else
                 rng.choice(["No, no defects are visible.", f"No defects; the {plural} look intact."])),
                number=len(defects), label=",".join(sorted({d["type"] for d in defects})) or "none"),
            "yes_no": yes_no}
    if n is not None:
        gens["counting"] = lambda: qa("counting", "object_count", rng.choice([
            f"How many {plural} are visible?", f"Count the {plural} in the image.",
            f"How many {plural} can you see in this micrograph?"]), rng.choice([
            f"There are {n} {plural}.", f"{n} {plural} are visible.", f"I count {n} {plural}."]), number=n)
    if size is not None:
        def size_qa():
            if fov and rng.random() < 0.25:                 # scale from the pixel size
                return qa("size", "field_of_view", rng.choice([
                    "What is the field of view of this image?", "How wide is the imaged area?"]),
                    f"The image spans {fov} ({px:g} nm per pixel).", number=w * px)
            return qa("size", "size_mean_nm", rng.choice([
                f"What is the average {size_word} of the {plural}?", f"How large are the {plural}?",
                f"Estimate the typical {singular} {size_word} in nm."]), rng.choice([
                f"About {fmt_length(size)}" + (f" (standard deviation {fmt_length(std)})." if std else "."),
                f"The mean {size_word} is roughly {fmt_length(size)}.",
                f"Around {fmt_length(size)} in {size_word}."]), number=size)
        gens["size"] = size_qa
    if gt.get("orientation_deg") is not None:
        a = gt["orientation_deg"]
        gens["orientation"] = lambda: qa("orientation", "orientation_deg", rng.choice([
            f"What is the dominant orientation of the {plural}?", f"At what angle do the {plural} run?",
            f"In which direction are the {plural} aligned?"]), rng.choice([
            f"About {a:.0f}° from the horizontal.", f"They are aligned at roughly {a:.0f}° to the x-axis.",
            f"Mostly at {a:.0f}° relative to horizontal."]), number=a)
    if gt.get("pitch_nm"):
        p, lw = gt["pitch_nm"], gt.get("line_width_nm")
        gens["pitch"] = lambda: qa("pitch", "pitch_nm", rng.choice([
            "What is the pitch of the pattern?", "What is the period of the line pattern?",
            "Estimate the pitch and line width."]), f"The pitch is about {fmt_length(p)}" + (
            f", with lines about {fmt_length(lw)} wide." if lw else "."), number=p)
    if gt.get("porosity") is not None or gt.get("coverage") is not None:
        por = gt.get("porosity") is not None
        frac = gt["porosity"] if por else gt["coverage"]
        gens["coverage"] = lambda: qa("coverage", "porosity" if por else "coverage", rng.choice(
            ["How porous is this material?", "What fraction of the area is pore space?"] if por else
            [f"What fraction of the area is covered by {plural}?", "Estimate the area coverage in percent."]),
            rng.choice([f"About {100 * frac:.0f}%.", f"Roughly {100 * frac:.0f}% of the area."]), number=100 * frac)
    types = list(gens)
    rng.shuffle(types)
    chosen = (types * (n_vqa // len(types) + 1))[:n_vqa]
    pairs, seen = [], set()
    for t in chosen:
        for _ in range(4):                                  # avoid asking the very same question twice
            item_qa = gens[t]()
            if item_qa["question"] not in seen:
                break
        seen.add(item_qa["question"])
        pairs.append(item_qa)
    return {"caption": caption, "caption_meta": {"template": "-".join(tid)}, "qa": pairs, "label": cat,
            "label_source": "ground_truth"}
