"""data_prep/annotate.py: the metadata teacher, the OpenAI-compatible teacher against a fake server on 127.0.0.1
(429/500/timeouts/malformed bodies/schema violations), kill-and-resume, validation against ground truth, bad input."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO
from fake_openai_server import FakeOpenAIServer, make_manifest

from data_prep.annotate import AnnotateConfig, check_answer, main
from semivlm.config import ConfigError
from semivlm.data import CATEGORIES, RecordError, read_jsonl

KEY = "sk-test-DO-NOT-LEAK-7f3a9c"
PHRASES = {"biological": "a biological sample", "fibres": "fibres", "films_coated_surface": "a film or coated surface",
           "mems_devices_electrodes": "a MEMS device or electrode", "nanowires": "nanowires", "particles": "particles",
           "patterned_surface": "a patterned surface", "porous_sponge": "a porous sponge", "powder": "a powder",
           "tips": "tips"}


def rows(path: Path) -> list[dict]:
    return list(read_jsonl(path)) if path.is_file() else []


def text_of(rec: dict, role: str) -> str:
    msg = next(m for m in rec["messages"] if m["role"] == role)
    return " ".join(p["text"] for p in msg["content"] if p["type"] == "text")


def lengths_nm(text: str) -> list[float]:
    return [float(v) * (1000 if u in ("µm", "um") else 1) for v, u in re.findall(r"(\d+(?:\.\d+)?) (nm|µm|um)", text)]


def manifest_rows(manifest: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(manifest)}


def assert_one_outcome_per_image(out: Path, ids) -> None:
    """Every image: exactly one complete set of records (one classify record) or exactly one failure entry."""
    classify = Counter(r["meta"]["image_id"] for r in rows(out / "classify.jsonl"))
    failures = Counter(r["image_id"] for r in rows(out / "failures.jsonl"))
    for i in ids:
        assert classify[i] + failures[i] == 1, (i, classify[i], failures[i])
    for name in ("captions", "vqa", "classify"):
        recs = rows(out / f"{name}.jsonl")
        assert len({r["id"] for r in recs}) == len(recs), f"duplicate ids in {name}.jsonl"
        assert all(classify[r["meta"]["image_id"]] == 1 for r in recs), f"records of an unfinished image in {name}"


def assert_key_absent(root: Path, *texts: str) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), f"API key leaked into {p}"
    for t in texts:
        assert KEY not in t


# ------------------------------------------------------------------------------------------------ metadata teacher
def test_metadata_teacher_is_deterministic_covers_every_question_type_and_agrees_with_ground_truth(tmp_path):
    manifest = make_manifest(tmp_path / "data", 50, seed=5)
    truth = manifest_rows(manifest)
    a = main(AnnotateConfig(manifest=str(manifest), out=str(tmp_path / "a"), vqa_per_image=8))
    main(AnnotateConfig(manifest=str(manifest), out=str(tmp_path / "b"), vqa_per_image=8))
    for name in ("captions", "vqa", "classify"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert a["failed"] == 0 and a["totals"] == {"captions": 50, "vqa": 400, "classify": 50, "failures": 0}
    assert set(a["question_types"]) == {"counting", "size", "category", "defect", "yes_no", "orientation", "pitch",
                                        "coverage"}
    assert_one_outcome_per_image(tmp_path / "a", truth)
    polarity = Counter()
    for rec in rows(tmp_path / "a" / "vqa.jsonl"):
        row, meta = truth[rec["meta"]["image_id"]], rec["meta"]
        gt, q, ans = row["ground_truth"], text_of(rec, "user"), text_of(rec, "assistant")
        assert (tmp_path / "a" / rec["images"][0]).resolve() == (manifest.parent / row["path"]).resolve()
        assert meta["task"] == "vqa" and meta["teacher"] == "metadata" and meta["split"] == row["split"]
        qt = meta["question_type"]
        if qt == "counting":
            assert int(re.search(r"\d+", ans).group()) == gt["object_count"], ans
        elif qt == "size" and meta["fact"] == "size_mean_nm":
            assert abs(lengths_nm(ans)[0] - gt["size_mean_nm"]) <= max(0.5, 0.005 * gt["size_mean_nm"]), ans
        elif qt == "size":                                       # field of view from the pixel size
            assert abs(lengths_nm(ans)[0] - row["width"] * row["pixel_size_nm"]) <= 0.006 * 1000 + 0.5, ans
        elif qt == "pitch":
            assert abs(lengths_nm(ans)[0] - gt["pitch_nm"]) <= 0.5, ans
        elif qt == "coverage":
            frac = gt["porosity"] if gt["porosity"] is not None else gt["coverage"]
            assert abs(float(re.search(r"(\d+)%", ans).group(1)) - 100 * frac) <= 0.5, ans
        elif qt == "orientation":
            assert abs(float(re.search(r"(\d+)°", ans).group(1)) - gt["orientation_deg"]) <= 0.5, ans
        elif qt == "category":
            assert meta["answer_label"] == gt["category"]
        elif qt == "defect":
            assert ans.startswith("Yes") == bool(gt["defects"]), ans
            for d in gt["defects"]:
                assert d["type"].split("_")[0].replace("contamination", "contamination particle") in ans, ans
        elif qt == "yes_no":
            if m := re.search(r"more than (\d+)", q):
                expected = gt["object_count"] > int(m.group(1))
            elif m := re.search(r"larger than (\S+ (nm|µm))", q):
                expected = gt["size_mean_nm"] > lengths_nm(m.group(1))[0]
            elif "TEM image" in q or "scanning electron" in q:
                expected = (row["modality"] == "TEM") == ("TEM image" in q)
            elif m := re.search(r"Does this image show (.+)\?", q):
                expected = m.group(1) == PHRASES[gt["category"]]
            else:
                kind = next(k for k in ("bridge", "missing", "contamination", "crack") if k in q)
                expected = any(kind in d["type"].replace("bridging", "bridge") for d in gt["defects"])
            assert ans.startswith("Yes" if expected else "No"), (q, ans)
            polarity[expected] += 1
    assert polarity[True] >= 5 and polarity[False] >= 5, polarity
    for rec in rows(tmp_path / "a" / "classify.jsonl"):
        gt = truth[rec["meta"]["image_id"]]["ground_truth"]
        assert rec["meta"]["label"] == gt["category"] and text_of(rec, "assistant") == CATEGORIES[gt["category"]]
    for rec in rows(tmp_path / "a" / "captions.jsonl"):
        gt = truth[rec["meta"]["image_id"]]["ground_truth"]
        cap = text_of(rec, "assistant")
        assert any(abs(v - gt["size_mean_nm"]) <= max(0.5, 0.005 * gt["size_mean_nm"]) for v in lengths_nm(cap)), cap
        assert ("defect-free" in cap or "No defects" in cap or "no visible defects" in cap) == (not gt["defects"])


def test_metadata_captions_use_many_paraphrase_templates(tmp_path):
    manifest = make_manifest(tmp_path / "data", 50, seed=6)
    main(AnnotateConfig(manifest=str(manifest), out=str(tmp_path / "out")))
    caps = rows(tmp_path / "out" / "captions.jsonl")
    templates = {c["meta"]["template"] for c in caps}
    openers = {t.split("-")[0] for t in templates}
    first_words = {" ".join(text_of(c, "assistant").split()[:2]) for c in caps}
    questions = {text_of(r, "user") for r in rows(tmp_path / "out" / "vqa.jsonl")}
    assert len(templates) >= 40 and len(openers) >= 7 and len(first_words) >= 8, (len(templates), openers)
    assert len({text_of(c, "assistant") for c in caps}) == 50 and len(questions) >= 60


def test_images_without_ground_truth_or_a_readable_file_get_one_failure_entry_naming_it(tmp_path):
    extra = [{"id": "ingested_1", "path": "images/synth_000000.png", "split": "train", "source": "/raw/a.dm4",
              "modality": "TEM", "width": 48, "height": 48, "pixel_size_nm": 0.2, "ground_truth": None},
             {"id": "gone", "path": "images/missing.png", "split": "train", "source": "synthetic", "modality": "SEM",
              "width": 48, "height": 48, "pixel_size_nm": 1.0,
              "ground_truth": {"category": "particles", "object_count": 3, "defects": []}}]
    extra.append({**extra[1], "id": "broken", "path": "images/broken.png"})
    manifest = make_manifest(tmp_path / "data", 3, extra_rows=extra)
    (tmp_path / "data/images/broken.png").write_bytes((tmp_path / "data/images/synth_000001.png").read_bytes()[:60])
    stats = main(AnnotateConfig(manifest=str(manifest), out=str(tmp_path / "out")))
    fails = {f["image_id"]: f["reason"] for f in rows(tmp_path / "out" / "failures.jsonl")}
    assert fails["ingested_1"] == "no ground truth for metadata teacher"
    assert fails["gone"].startswith("image file not found") and "images/missing.png" in fails["gone"]
    assert fails["broken"].startswith("image does not decode") and "images/broken.png" in fails["broken"]
    assert stats["annotated"] == 3 and stats["failed"] == 3
    assert_one_outcome_per_image(tmp_path / "out", manifest_rows(manifest))


def test_bad_manifest_line_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    manifest = make_manifest(tmp_path / "data", 4)
    with manifest.open("a") as f:
        f.write("{this is not json\n")
    with pytest.raises(RecordError, match=r"manifest\.jsonl:5: not a JSON object"):
        main(AnnotateConfig(manifest=str(manifest), out=str(tmp_path / "out")))
    stats = main(AnnotateConfig(manifest=str(manifest), out=str(tmp_path / "out"), skip_invalid=True))
    assert stats["manifest_skipped"] == {"bad_json": 1} and stats["annotated"] == 4


def test_unknown_teacher_is_a_clear_config_error(tmp_path):
    manifest = make_manifest(tmp_path / "data", 1)
    with pytest.raises(ConfigError, match="unknown teacher 'gpt4'; choose one of metadata, openai, transformers"):
        main(AnnotateConfig(teacher="gpt4", manifest=str(manifest), out=str(tmp_path / "out")))


# ------------------------------------------------------------------------------------ openai teacher, fake server
SCRIPT = {"synth_000001": ["429"], "synth_000002": ["500"], "synth_000003": ["timeout"],
          "synth_000004": ["malformed"], "synth_000005": ["schema"] * 9, "synth_000006": ["contradict"],
          "synth_000007": ["400"], "synth_000008": ["500"] * 9, "synth_000009": ["schema", "malformed", "ok"]}


def openai_cfg(manifest, out, server, **kw) -> AnnotateConfig:
    values = dict(teacher="openai", manifest=str(manifest), out=str(out), base_url=server.base_url, model="fake-vlm",
                  timeout_s=0.6, backoff_base_s=0.01, backoff_max_s=0.05, max_retries=2, concurrency=4)
    return AnnotateConfig(**{**values, **kw})


def test_openai_teacher_survives_429_500_timeouts_malformed_and_schema_violations(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    manifest = make_manifest(tmp_path / "data", 12, seed=2)
    out = tmp_path / "out"
    with FakeOpenAIServer(manifest, script=SCRIPT, timeout_sleep_s=1.0) as server:
        stats = main(openai_cfg(manifest, out, server))
        log = list(server.log)
        again = main(openai_cfg(manifest, out, server))                  # everything done: no new request
        assert len(server.log) == len(log) and again["already_done"] == 12 and again["records_this_run"] == 0
    assert_one_outcome_per_image(out, manifest_rows(manifest))
    fails = {f["image_id"]: f for f in rows(out / "failures.jsonl")}
    assert set(fails) == {"synth_000005", "synth_000007", "synth_000008"}
    assert "schema" in fails["synth_000005"]["reason"] and fails["synth_000005"]["attempts"] == 3
    assert fails["synth_000007"]["reason"].startswith("HTTP 400") and fails["synth_000007"]["attempts"] == 1
    assert "Bearer ***" in fails["synth_000008"]["reason"]            # the server echoed the key: redacted
    per_image = Counter(e["image_id"] for e in log)
    assert per_image["synth_000005"] == 3 and per_image["synth_000007"] == 1 and per_image["synth_000009"] == 3
    assert all(per_image[f"synth_{i:06d}"] == 2 for i in (1, 2, 3, 4))
    t429 = [e["t"] for e in log if e["image_id"] == "synth_000001"]
    assert t429[1] - t429[0] >= 0.9, "Retry-After: 1 was not honoured"
    assert {e["response_format"] for e in log} == {"json_schema"} and {e["auth"] for e in log} == {f"Bearer {KEY}"}
    assert stats["retries"]["rate_limit"] == 1 and stats["retries"]["timeout"] == 1
    assert stats["retries"]["invalid_answer"] >= 4 and stats["retries"]["http_500"] >= 3
    assert stats["validation"]["category_field"]["dropped"] == 1 and stats["validation"]["count"]["dropped"] == 1
    captured = capsys.readouterr()
    assert_key_absent(tmp_path, captured.out, captured.err)


def test_stats_keep_totals_over_all_runs_and_the_last_runs_own_figures(tmp_path, monkeypatch):
    """A first run limited to 4 images, then a rerun that completes the other 4: each run has a retry, a validation
    drop and a failure of its own. all_runs is the sum of the two runs; the top level is the second run's alone."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    manifest = make_manifest(tmp_path / "data", 8, seed=5)
    script = {"synth_000000": ["429"], "synth_000001": ["contradict"], "synth_000002": ["500"] * 9,
              "synth_000004": ["500"], "synth_000005": ["contradict"], "synth_000006": ["400"],
              "synth_000007": ["timeout"]}
    out = tmp_path / "out"
    with FakeOpenAIServer(manifest, script=script, retry_after="0", timeout_sleep_s=1.0) as server:
        first = main(openai_cfg(manifest, out, server, limit=4))
        second = main(openai_cfg(manifest, out, server))
    assert_one_outcome_per_image(out, manifest_rows(manifest))
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == second and not (out / "stats.json.tmp").exists()
    # each run's own figures: what that run did, and nothing of the other
    assert (first["annotated"], first["failed"], second["annotated"], second["failed"]) == (3, 1, 3, 1)
    assert second["already_done"] == 4 and first["retries"] == {"rate_limit": 1, "http_500": 3}
    assert second["retries"] == {"http_500": 1, "timeout": 1}
    assert [k[:8] for k in first["failure_reasons"]] == ["HTTP 500"]
    assert [k[:8] for k in second["failure_reasons"]] == ["HTTP 400"]
    assert first["validation"]["count"]["dropped"] == 1 and second["validation"]["count"]["dropped"] == 1
    assert first["all_runs"]["runs"] == 1 and first["all_runs"]["annotated"] == 3
    # the totals: the sum of the two runs, count by count
    total = second["all_runs"]
    assert total["runs"] == 2 and total["annotated"] == 6 and total["failed"] == 2
    assert total["records"] == first["records_this_run"] + second["records_this_run"] == \
        sum(second["totals"][n] for n in ("captions", "vqa", "classify"))
    assert total["retries"] == {"http_500": 4, "rate_limit": 1, "timeout": 1}
    assert total["failure_reasons"] == {**first["failure_reasons"], **second["failure_reasons"]}
    assert sum(total["failure_reasons"].values()) == 2
    assert total["teacher_requests"] == first["teacher_requests"] + second["teacher_requests"] == len(server.log)
    for check, v in total["validation"].items():
        runs = [r["validation"].get(check, {"checked": 0, "dropped": 0}) for r in (first, second)]
        assert v["checked"] == sum(r["checked"] for r in runs) and v["dropped"] == sum(r["dropped"] for r in runs)
        assert v["rate"] == round(v["dropped"] / max(v["checked"], 1), 4)
    assert total["validation"]["count"]["dropped"] == 2
    # a third run with nothing left to do adds a run and no counts
    third = json.loads(json.dumps(main(openai_cfg(manifest, out, server))))
    assert third["all_runs"] == {**total, "runs": 3, "seconds": third["all_runs"]["seconds"]}


def test_rejected_credentials_stop_the_run_with_one_clear_line_and_no_failure_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    manifest = make_manifest(tmp_path / "data", 4)
    with FakeOpenAIServer(manifest, script={f"synth_{i:06d}": ["401"] for i in range(4)}) as server:
        with pytest.raises(SystemExit, match="refused the credentials") as e:
            main(openai_cfg(manifest, tmp_path / "out", server, concurrency=2))
        assert len(server.log) <= 2                                   # no request after the first refusal returns
    assert KEY not in str(e.value) and rows(tmp_path / "out" / "failures.jsonl") == []


def test_an_unreachable_server_stops_the_run_without_marking_images_failed(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    manifest = make_manifest(tmp_path / "data", 3)
    with socket.socket() as s:                                          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = AnnotateConfig(teacher="openai", manifest=str(manifest), out=str(tmp_path / "out"), model="m",
                         base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base_s=0.01, timeout_s=2)
    with pytest.raises(SystemExit, match=f"cannot reach http://127.0.0.1:{port}/v1"):
        main(cfg)
    assert rows(tmp_path / "out" / "failures.jsonl") == []


def test_validation_drops_contradicting_answers_and_counts_each_check(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    manifest = make_manifest(tmp_path / "data", 6, seed=4)
    truth = manifest_rows(manifest)
    with FakeOpenAIServer(manifest, script={i: ["contradict"] for i in truth}) as server:
        stats = main(openai_cfg(manifest, tmp_path / "out", server))
    v = stats["validation"]
    for check in ("category_field", "count", "size"):
        assert v[check]["dropped"] == 6 and v[check]["rate"] == 1.0, (check, v)
    assert v["defect"]["dropped"] == 12 and v["category"]["dropped"] == 6
    assert rows(tmp_path / "out" / "captions.jsonl") == []
    assert [r["meta"]["question_type"] for r in rows(tmp_path / "out" / "vqa.jsonl")] == ["category"] * 6
    assert {r["meta"]["label"] for r in rows(tmp_path / "out" / "classify.jsonl")} == \
        {r["ground_truth"]["category"] for r in truth.values()}
    # the checks one by one, on hand-written answers
    row = {**truth["synth_000000"], "modality": "SEM", "pixel_size_nm": 2.0, "width": 100, "height": 100}
    row["ground_truth"] = {**row["ground_truth"], "object_count": 20, "size_mean_nm": 50.0, "defects": [],
                           "orientation_deg": 30.0, "coverage": 0.4, "porosity": None, "category": "particles"}
    cfg = AnnotateConfig()
    assert check_answer("About 52 nm.", "size", "How big?", row, cfg) == {"size": True}
    assert check_answer("About 0.2 µm.", "size", "How big?", row, cfg) == {"size": False}
    assert check_answer("About 200 nm.", "size", "What is the field of view?", row, cfg) == {"size": True}
    assert check_answer("21 particles.", "counting", "", row, cfg)["count"] is True
    assert check_answer("45 particles.", "counting", "", row, cfg)["count"] is False
    assert check_answer("Yes, a crack near the edge.", "defect", "", row, cfg) == {"defect": False}
    assert check_answer("No defects are visible.", "defect", "", row, cfg) == {"defect": True}
    assert check_answer("Yes.", "yes_no", "Is there any defect?", row, cfg) == {"defect": False}
    assert check_answer("Oriented at 160°.", "orientation", "", row, cfg) == {"orientation": False}
    assert check_answer("Oriented at 40 degrees.", "orientation", "", row, cfg) == {"orientation": True}
    assert check_answer("About 80% coverage.", "coverage", "", row, cfg) == {"coverage": False}
    assert check_answer("A TEM image of nanowires.", None, "", row, cfg) == {"modality": False, "category": False}


def test_killed_run_resumes_without_repeating_requests_or_duplicating_records(tmp_path):
    manifest = make_manifest(tmp_path / "data", 16, seed=7)
    out, cache = tmp_path / "out", tmp_path / "out" / "cache"
    script = {"synth_000003": ["schema"] * 9}                      # one image ends as a failure entry
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    with FakeOpenAIServer(manifest, script=script, delay_s=0.25) as server:
        args = [sys.executable, str(REPO / "data_prep/annotate.py"), "--teacher", "openai", "--manifest",
                str(manifest), "--out", str(out), "--base_url", server.base_url, "--model", "fake-vlm",
                "--concurrency", "2", "--max_retries", "1", "--backoff_base_s", "0.01", "--timeout_s", "5"]
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while len(rows_safe(out / "classify.jsonl")) < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)                               # a real kill, mid-run
        first_out = proc.communicate(timeout=30)[0]
        done_before = {r["meta"]["image_id"] for r in rows_safe(out / "classify.jsonl")}
        cached_before = len(list(cache.rglob("*.json")))
        n_first = len(server.log)
        assert 4 <= len(done_before) < 16, "the kill came too late to test resuming"
        with (out / "vqa.jsonl").open("a") as f:                       # what a kill mid-write leaves behind
            f.write('{"id": "synth_000015.vqa00", "images": ["../da')
        second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        new = server.log[n_first:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["repaired_lines"] >= 1 and stats["already_done"] >= len(done_before)
    assert not {e["image_id"] for e in new} & done_before, "a finished image was requested again"
    failed_requests = 2                                                # synth_000003: 2 attempts, no cache entry
    assert len(new) <= 16 - cached_before + failed_requests, (len(new), cached_before)
    assert_one_outcome_per_image(out, manifest_rows(manifest))
    assert [f["image_id"] for f in rows(out / "failures.jsonl")] == ["synth_000003"]
    assert_key_absent(tmp_path, first_out, second.stdout, second.stderr)


def rows_safe(path: Path) -> list[dict]:
    """Complete lines of a file another process is appending to."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def test_transformers_teacher_records_clean_failures_when_a_tiny_random_llava_outputs_garbage(tmp_path):
    pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<image>"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="</s>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}"
                "<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}\n{% endfor %}assistant: ")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=28),
                          tokenizer=hf_tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=28, patch_size=14),
                         text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
                         image_token_index=vocab["<image>"], vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    model_dir = tmp_path / "tiny_llava"
    LlavaForConditionalGeneration(config).save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    manifest = make_manifest(tmp_path / "data", 2)
    stats = main(AnnotateConfig(teacher="transformers", model=str(model_dir), manifest=str(manifest),
                                out=str(tmp_path / "out"), max_tokens=8, max_retries=1))
    fails = rows(tmp_path / "out" / "failures.jsonl")
    assert stats["failed"] == 2 and stats["teacher_requests"] == 4
    assert all(f["reason"].startswith("invalid answer") and f["attempts"] == 2 for f in fails)
    assert_one_outcome_per_image(tmp_path / "out", manifest_rows(manifest))
