"""Test helpers: a tiny micrograph manifest drawn with PIL, and a fake OpenAI-compatible server on 127.0.0.1.

The server answers POST /v1/chat/completions. Each request is attributed to an image (the sha256 of its data URL)
and served a behaviour from a per-image script (the n-th request of an image gets script[n], then "ok"):
ok | contradict | 429 (Retry-After) | 500 (its body echoes the Authorization header) | timeout (sleeps past the
client timeout) | malformed (a cut JSON body) | schema (an answer violating the schema) | 400 | 401. It is bounded: past
`max_requests` it answers 503 and counts the overflow, and it binds 127.0.0.1 only.

    benchmark_against_fake_server(n_images=64, concurrency=8) -> {"records_per_s": ..., ...}
"""
from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from semivlm.data import CATEGORIES

FIXTURE_CATEGORIES = ["particles", "nanowires", "patterned_surface", "porous_sponge", "fibres", "tips",
                      "films_coated_surface", "powder", "biological", "mems_devices_electrodes"]
DEFECT_TYPES = ["line_bridging", "missing_feature", "contamination_particle", "crack"]


def make_ground_truth(category: str, rng: random.Random, size: int) -> dict:
    elongated = category in ("nanowires", "fibres", "patterned_surface", "mems_devices_electrodes")
    gt = {"category": category, "object_count": rng.randint(3, 40), "size_mean_nm": round(rng.uniform(8, 400), 1),
          "size_std_nm": round(rng.uniform(0.5, 20), 1),
          "orientation_deg": round(rng.uniform(0, 180), 1) if elongated else None,
          "coverage": round(rng.uniform(0.05, 0.6), 3), "porosity": None, "pitch_nm": None, "line_width_nm": None,
          "defects": [], "imaging": {"noise_sigma": round(rng.uniform(0.01, 0.12), 3),
                                     "charging": round(rng.uniform(0, 0.5), 2), "edge_brightening": 0.5,
                                     "defocus_px": round(rng.uniform(0, 2.5), 2), "brightness": 0.45,
                                     "contrast": 0.8, "data_bar": rng.random() < 0.3}}
    if category == "porous_sponge":
        gt["porosity"], gt["coverage"] = round(rng.uniform(0.2, 0.7), 3), None
    if category == "patterned_surface":
        gt["pitch_nm"] = round(rng.uniform(40, 200), 1)
        gt["line_width_nm"] = round(gt["pitch_nm"] * rng.uniform(0.3, 0.6), 1)
        gt["size_mean_nm"] = gt["line_width_nm"]
    if rng.random() < 0.5:
        gt["defects"] = [{"type": rng.choice(DEFECT_TYPES), "x_px": rng.randrange(size), "y_px": rng.randrange(size)}
                         for _ in range(rng.randint(1, 2))]
    return gt


def make_manifest(root: str | Path, n: int, seed: int = 0, size: int = 48, extra_rows: list | None = None) -> Path:
    """`n` small synthetic micrographs (PIL drawings, each different) and their manifest; returns the manifest."""
    from PIL import Image, ImageDraw

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cat = FIXTURE_CATEGORIES[i % len(FIXTURE_CATEGORIES)]
        gt = make_ground_truth(cat, rng, size)
        img = Image.new("L", (size, size), rng.randrange(20, 80))
        draw = ImageDraw.Draw(img)
        for _ in range(min(gt["object_count"], 12)):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(2, 6)
            if gt["orientation_deg"] is None:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=rng.randrange(150, 255))
            else:
                draw.line([x, y, x + 3 * r, y + 2 * r], fill=rng.randrange(150, 255), width=2)
        draw.point((i % size, (i // size) % size), fill=255)       # every image unique
        path = f"images/synth_{i:06d}.png"
        img.save(root / path)
        rows.append({"id": f"synth_{i:06d}", "path": path, "split": ["train", "train", "validation", "test"][i % 4],
                     "source": "synthetic", "modality": "SEM" if i % 3 else "TEM", "width": size, "height": size,
                     "pixel_size_nm": round(rng.uniform(0.5, 20), 2), "instrument": {"voltage_kv": 5},
                     "provenance": {}, "ground_truth": gt})
    rows += extra_rows or []
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def true_answer(row: dict) -> dict:
    """A correct teacher answer (what a good VLM would say) for a manifest row."""
    gt = row["ground_truth"]
    return {"caption": f"A {row['modality']} micrograph of {CATEGORIES[gt['category']]} with "
                       f"{gt['object_count']} objects about {gt['size_mean_nm']:.0f} nm across. "
                       + ("No defects are visible." if not gt["defects"] else "A defect is visible."),
            "qa": [{"question": "How many objects are visible?", "answer": f"{gt['object_count']} objects.",
                    "question_type": "counting"},
                   {"question": "What is their size?", "answer": f"About {gt['size_mean_nm']:.0f} nm.",
                    "question_type": "size"},
                   {"question": "Are there any defects?", "answer": "Yes, there is a defect." if gt["defects"]
                    else "No, there are no defects.", "question_type": "defect"}],
            "category": gt["category"]}


def wrong_answer(row: dict) -> dict:
    """An answer contradicting the ground truth in category, count, size and defects."""
    gt = row["ground_truth"]
    other = next(c for c in FIXTURE_CATEGORIES if c != gt["category"])
    return {"caption": f"A micrograph of {CATEGORIES[other]}. "
                       + ("No defects are visible." if gt["defects"] else "A large crack is visible."),
            "qa": [{"question": "How many objects are visible?", "answer": f"{gt['object_count'] * 3 + 10} objects.",
                    "question_type": "counting"},
                   {"question": "What is their size?", "answer": f"About {gt['size_mean_nm'] * 4:.0f} nm.",
                    "question_type": "size"},
                   {"question": "Are there any defects?", "answer": "No, there are no defects." if gt["defects"]
                    else "Yes, a crack.", "question_type": "defect"},
                   {"question": "What is the texture?", "answer": "Smooth.", "question_type": "category"}],
            "category": other}


class FakeOpenAIServer:
    def __init__(self, manifest: Path, script: dict | None = None, delay_s: float = 0.0, timeout_sleep_s: float = 1.5,
                 retry_after: str = "1", max_requests: int = 2000):
        rows = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]
        self.by_sha, self.rows = {}, {}
        for r in rows:
            p = Path(manifest).parent / r["path"]
            if p.is_file() and r.get("ground_truth"):
                url = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
                self.by_sha[hashlib.sha256(url.encode()).hexdigest()] = r["id"]
                self.rows[r["id"]] = r
        self.script, self.delay_s, self.timeout_sleep_s = script or {}, delay_s, timeout_sleep_s
        self.retry_after, self.max_requests = retry_after, max_requests
        self.log: list[dict] = []               # one entry per request: image id, behaviour, time, auth header
        self.lock, self.overflow = threading.Lock(), 0
        self.httpd: ThreadingHTTPServer | None = None

    def requests_for(self, image_id: str) -> int:
        return sum(1 for e in self.log if e["image_id"] == image_id)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, b'{"error": {"message": "not found"}}')
                url = next((part["image_url"]["url"] for m in body.get("messages", []) if isinstance(m["content"], list)
                            for part in m["content"] if part.get("type") == "image_url"), "")
                image_id = server.by_sha.get(hashlib.sha256(url.encode()).hexdigest(), "?") if url else "text"
                auth = self.headers.get("Authorization", "")
                with server.lock:
                    n = server.requests_for(image_id)
                    steps = server.script.get(image_id, [])
                    behaviour = steps[n] if n < len(steps) else "ok"
                    if len(server.log) >= server.max_requests:
                        server.overflow += 1
                        behaviour = "overflow"
                    server.log.append({"image_id": image_id, "behaviour": behaviour, "t": time.time(), "auth": auth,
                                       "response_format": body.get("response_format", {}).get("type")})
                if server.delay_s:
                    time.sleep(server.delay_s)
                row = server.rows.get(image_id)
                if behaviour == "overflow":
                    return self._send(503, b'{"error": {"message": "request budget exhausted"}}')
                if behaviour == "429":
                    return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": server.retry_after})
                if behaviour == "500":
                    return self._send(500, json.dumps({"error": {"message": f"boom; saw header {auth}"}}).encode())
                if behaviour == "401":
                    return self._send(401, json.dumps({"error": {"message": f"bad key {auth}"}}).encode())
                if behaviour == "400":
                    return self._send(400, b'{"error": {"message": "image too large"}}')
                if behaviour == "timeout":
                    time.sleep(server.timeout_sleep_s)
                if behaviour == "malformed":
                    return self._send(200, b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"ind')
                if not url:                                     # a text request (make_instructions.py)
                    prompt = body["messages"][-1]["content"]
                    prompt = prompt if isinstance(prompt, str) else prompt[-1]["text"]
                    tag = hashlib.sha256(prompt.encode()).hexdigest()[:8]
                    answer = {"pairs": [{"instruction": f"Explain passage {tag}.", "response": prompt[-200:],
                                         "kind": "principle"}]}
                    if behaviour == "schema":
                        answer = {"pairs": [{"instruction": "x", "kind": "poetry"}]}
                elif row is None:
                    answer = {"caption": "unknown image", "qa": [], "category": "nope"}
                elif behaviour == "schema":
                    answer = {"qa": [{"question": "Colour?", "answer": "grey", "question_type": "colour"}],
                              "category": row["ground_truth"]["category"]}
                elif behaviour == "contradict":
                    answer = wrong_answer(row)
                else:
                    answer = true_answer(row)
                out = {"id": f"chatcmpl-{len(server.log)}", "object": "chat.completion", "created": 0,
                       "model": body.get("model", "fake"), "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": json.dumps(answer)}}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}
                return self._send(200, json.dumps(out).encode())

        return Handler

    def __enter__(self) -> "FakeOpenAIServer":
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def benchmark_against_fake_server(n_images: int = 64, concurrency: int = 8, delay_s: float = 0.0) -> dict:
    """annotate.py (--teacher openai) against the fake server on 127.0.0.1: records/s and images/s of a cold run
    (no cache) and of a warm rerun from the cache (outputs removed, cache kept). The server runs in this process
    (a thread), so on a small CPU it competes with the client for the GIL: the numbers are a floor for the client."""
    import os
    import shutil

    import openai  # noqa: F401  (imported before timing: its import alone takes ~2 s on a small CPU)

    from data_prep.annotate import AnnotateConfig, main

    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-placeholder")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_manifest(Path(tmp) / "data", n_images, seed=1)
        with FakeOpenAIServer(manifest, delay_s=delay_s) as server:
            cfg = AnnotateConfig(teacher="openai", manifest=str(manifest), out=str(Path(tmp) / "out"),
                                 base_url=server.base_url, model="fake-vlm", concurrency=concurrency,
                                 cache_dir=str(Path(tmp) / "cache"), timeout_s=30)
            cold = main(cfg)
            shutil.rmtree(Path(tmp) / "out")
            warm = main(cfg)
            requests = len(server.log)
    return {"n_images": n_images, "concurrency": concurrency, "server_delay_s": delay_s,
            "records_per_s": cold["records_per_s"], "images_per_s": round(n_images / max(cold["seconds"], 1e-9), 2),
            "cached_records_per_s": warm["records_per_s"], "requests": requests,
            "records": cold["records_this_run"]}


if __name__ == "__main__":
    args = dict(re.findall(r"--(\w+)[= ](\S+)", " ".join(sys.argv[1:])))
    print(json.dumps(benchmark_against_fake_server(int(args.get("n_images", 64)), int(args.get("concurrency", 8)),
                                                   float(args.get("delay_s", 0.0))), indent=2))
