"""Teacher clients shared by data_prep/annotate.py and data_prep/make_instructions.py.

* `OpenAITeacher`: any OpenAI-compatible endpoint (vLLM, SGLang, Ollama, hosted) through the official `openai` client
  (`AsyncOpenAI`, its own retries off). Our policy: bounded concurrency (a semaphore), exponential backoff with jitter
  on 429, 5xx, timeouts and connection errors, `Retry-After` honoured, a malformed body or an answer that violates the
  JSON schema counts as a failed attempt. Validated answers are cached on disk, keyed by the sha256 of (model, prompt
  text, image bytes, sampling parameters): a rerun sends no request for a cached item.
* `TransformersTeacher`: a local VLM directory (`AutoModelForImageTextToText` + `AutoProcessor`), same prompts, JSON
  parsed out of the generated text.
* `TeacherConfig`: the teacher fields both scripts' configs inherit (one place for their names and defaults).
* JSON schemas of the answers (pydantic), `response_format` built from them, JSON extraction from free text,
  repair of an append-only JSONL whose last line a kill cut in half, and redaction of the API key.

The API key comes only from the environment (`OPENAI_API_KEY`); it is never stored here, and every message this module
produces goes through `redact` so that a server echoing it back cannot leak it into a log or a failure entry.
"""
from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from semivlm.config import ConfigError
from semivlm.data import CATEGORIES

QUESTION_TYPES = ("counting", "size", "category", "defect", "yes_no", "orientation", "pitch", "coverage")
INSTRUCTION_KINDS = ("principle", "calculation", "process_control", "defect_diagnosis")
PLACEHOLDER_KEY = "EMPTY"          # sent to local servers without auth when OPENAI_API_KEY is unset


# ------------------------------------------------------------------------------------------------ answer schemas
class QAPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=3)
    answer: str = Field(min_length=1)
    question_type: Literal[QUESTION_TYPES]  # type: ignore[valid-type]


class ImageAnnotation(BaseModel):
    """What the teacher returns for one micrograph: a caption, question-answer pairs and a category."""
    model_config = ConfigDict(extra="forbid")
    caption: str = Field(min_length=10)
    qa: list[QAPair] = Field(min_length=1)
    category: Literal[tuple(CATEGORIES)]  # type: ignore[valid-type]


class InstructionPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(min_length=5)
    response: str = Field(min_length=5)
    kind: Literal[INSTRUCTION_KINDS]  # type: ignore[valid-type]


class InstructionSet(BaseModel):
    """What the teacher returns for one corpus chunk."""
    model_config = ConfigDict(extra="forbid")
    pairs: list[InstructionPair] = Field(min_length=1)


def response_format(schema_cls: type[BaseModel], mode: str = "json_schema") -> dict | None:
    """The `response_format` argument: a strict JSON schema built from the pydantic model (or json_object / none)."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": schema_cls.__name__,
                                                       "schema": schema_cls.model_json_schema(), "strict": True}}
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "none":
        return None
    raise ValueError(f"response_format must be json_schema, json_object or none, got {mode!r}")


def extract_json(text: str) -> str:
    """The JSON object inside a model's free text (code fences and chatter around it dropped)."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the model output")
    return text[start:end + 1]


def validate_answer(schema_cls: type[BaseModel], text: str | None) -> BaseModel:
    """Parse and validate; raises ValueError with a short reason (the first schema errors) on failure."""
    if not text:
        raise ValueError("empty answer")
    try:
        return schema_cls.model_validate_json(extract_json(text))
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise ValueError(f"answer violates the {schema_cls.__name__} schema ({errs})") from None


# ----------------------------------------------------------------------------------------------- small helpers
def read_prompt(prompts_dir: str, name: str) -> str:
    """<prompts_dir>/<name>.txt, the directory taken from the working directory or else from the repository root."""
    d = Path(prompts_dir)
    if not d.is_dir() and not d.is_absolute():
        d = Path(__file__).resolve().parents[1] / prompts_dir
    if not (d / f"{name}.txt").is_file():
        raise ConfigError(f"prompt file {d / (name + '.txt')} does not exist (--prompts_dir)")
    return (d / f"{name}.txt").read_text(encoding="utf-8").strip()


def render(template: str, name: str, values: dict) -> str:
    """A prompt file's text with its {placeholders} filled; a clear error for an unknown one."""
    try:
        return template.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"prompt {name}.txt: bad placeholder {e} (known: {', '.join(sorted(values))}; "
                          "write {{ }} for literal braces)") from None


def api_key_from_env() -> str | None:
    return os.environ.get("OPENAI_API_KEY") or None


def redact(text: object) -> str:
    """`str(text)` with the API key (from the environment) replaced by ***."""
    s = str(text)
    key = api_key_from_env()
    if key and len(key) >= 4:
        s = s.replace(key, "***")
    return s


def png_data_url(image_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes).decode()


def repair_jsonl(path: str | Path) -> int:
    """Make an append-only JSONL safe to append to after a kill: a half-written last line (no newline, or not JSON)
    and any line that is not a JSON object are removed (atomic rewrite). Returns how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()                      # b"" when the file ends with a newline, else a cut line
    kept, dropped = [], int(bool(tail.strip()))
    for line in lines:
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped or tail:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        tmp.replace(path)
    return dropped


class TeacherError(Exception):
    """One item could not be annotated: the reason (redacted) and the attempts made."""

    def __init__(self, reason: str, attempts: int = 0):
        super().__init__(redact(reason))
        self.reason, self.attempts = redact(reason), attempts


class FatalTeacherError(RuntimeError):
    """Every item would fail the same way (bad key, unknown model, wrong URL): the run stops with one clear line
    (the scripts turn it into SystemExit after cancelling the other requests), no failure entries written."""

    def __init__(self, message: str):
        super().__init__(f"teacher error: {redact(message)}")


class DiskCache:
    """One JSON file per key under `root/ab/<sha256>.json`, written atomically; a corrupt file is a miss."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(model: str, prompt: str, image: bytes | None, sampling: dict) -> str:
        h = hashlib.sha256()
        for part in (model.encode(), prompt.encode(), image or b"", json.dumps(sampling, sort_keys=True).encode()):
            h.update(hashlib.sha256(part).digest())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            p.unlink(missing_ok=True)
            return None

    def put(self, key: str, value: dict) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        tmp.replace(p)


def retry_after_seconds(response) -> float | None:
    """Seconds from a `Retry-After` (seconds or HTTP date) or `retry-after-ms` header, if the server sent one."""
    if response is None:
        return None
    headers = response.headers
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


# ------------------------------------------------------------------------------------------------- the teachers
@dataclass
class TeacherConfig:
    """The teacher fields annotate.py's and make_instructions.py's configs inherit (each sets its own `teacher`)."""
    base_url: str = ""                  # openai: server URL (or OPENAI_BASE_URL); the key only from OPENAI_API_KEY
    model: str = ""                     # openai: served model name; transformers: local model directory
    prompts_dir: str = "data_prep/prompts"
    response_format: str = "json_schema"    # json_schema | json_object | none (servers without structured output)
    concurrency: int = 8                # requests in flight
    max_retries: int = 4                # per request, on 429, 5xx, timeouts, connection errors and invalid answers
    timeout_s: float = 120.0
    backoff_base_s: float = 1.0         # exponential backoff with jitter, capped; Retry-After wins when sent
    backoff_max_s: float = 60.0
    temperature: float = 0.2
    max_tokens: int = 1024
    cache_dir: str = ""                 # "" = <out>/cache

    def openai_teacher(self, out: Path, seed: int | None, log=print) -> OpenAITeacher:
        return OpenAITeacher(self.model, self.base_url, self.concurrency, self.max_retries, self.timeout_s,
                             self.temperature, self.max_tokens, seed, self.cache_dir or Path(out) / "cache",
                             self.backoff_base_s, self.backoff_max_s, self.response_format, log)

class OpenAITeacher:
    """Async chat-completions client with our retry policy, a semaphore and a disk cache."""

    name = "openai"

    def __init__(self, model: str, base_url: str = "", concurrency: int = 8, max_retries: int = 4,
                 timeout_s: float = 120.0, temperature: float = 0.2, max_tokens: int = 1024, seed: int | None = 0,
                 cache_dir: str | Path = "cache", backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 response_format_mode: str = "json_schema", log=print):
        from openai import AsyncOpenAI

        base_url = base_url or os.environ.get("OPENAI_BASE_URL", "")
        if not model:
            raise ConfigError("--model is required for --teacher openai (the served model name)")
        key = api_key_from_env()
        if key is None and not base_url:
            raise ConfigError("--teacher openai needs OPENAI_API_KEY in the environment for the hosted "
                              "API, or --base_url (or OPENAI_BASE_URL) for a local server")
        self.base_url = base_url or "https://api.openai.com/v1"
        self.client = AsyncOpenAI(api_key=key or PLACEHOLDER_KEY, base_url=self.base_url, timeout=timeout_s,
                                  max_retries=0)
        self.model, self.max_retries, self.log = model, max_retries, log
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed,
                         "response_format": response_format_mode}
        self.format_mode = response_format_mode
        self.backoff = (backoff_base_s, backoff_max_s)
        self.sem = asyncio.Semaphore(max(1, concurrency))
        self.formats: dict[str, dict | None] = {}          # response_format per schema, built once
        self.cache = DiskCache(cache_dir)
        self.requests, self.cache_hits, self.retries, self.responses = 0, 0, {}, 0

    def _count_retry(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1

    async def ask(self, system: str, user: str, image: bytes | None, schema_cls: type[BaseModel]):
        """The validated answer for one item, from the cache or the server. Raises TeacherError when every attempt
        failed, FatalTeacherError when no item can succeed (authentication, unknown model or path)."""
        import openai

        sampling = {**self.sampling, "schema": schema_cls.__name__}
        key = DiskCache.key(self.model, system + "\n\x00\n" + user, image, sampling)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                answer = schema_cls.model_validate(cached)
                self.cache_hits += 1
                return answer, {"cached": True, "attempts": 0}
            except ValidationError:
                pass                                    # schema changed since: ask again
        content: list = [{"type": "text", "text": user}]
        if image is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(image)}})
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        extra = {}
        if schema_cls.__name__ not in self.formats:
            self.formats[schema_cls.__name__] = response_format(schema_cls, self.format_mode)
        if (fmt := self.formats[schema_cls.__name__]) is not None:
            extra["response_format"] = fmt
        if self.sampling["seed"] is not None:
            extra["seed"] = self.sampling["seed"]
        reason, attempt, connection_errors = "no attempt made", 0, 0
        for attempt in range(1, self.max_retries + 2):
            wait = None
            try:
                async with self.sem:
                    self.requests += 1
                    resp = await self.client.chat.completions.create(
                        model=self.model, messages=messages, temperature=self.sampling["temperature"],
                        max_tokens=self.sampling["max_tokens"], **extra)
                text = resp.choices[0].message.content if resp.choices else None
                self.responses += 1
                answer = validate_answer(schema_cls, text)
                self.cache.put(key, answer.model_dump())
                return answer, {"cached": False, "attempts": attempt}
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise FatalTeacherError(f"{self.base_url} refused the credentials (HTTP {e.status_code}): set "
                                        "OPENAI_API_KEY for this server") from None
            except openai.NotFoundError as e:
                raise FatalTeacherError(f"{self.base_url}: model '{self.model}' or the chat/completions route was not "
                                        f"found (HTTP 404: {str(e)[:200]})") from None
            except openai.RateLimitError as e:
                self.responses += 1
                reason, wait = f"HTTP 429 rate limited: {str(e)[:200]}", retry_after_seconds(e.response)
                self._count_retry("rate_limit")
            except openai.APIStatusError as e:
                self.responses += 1
                if e.status_code < 500 and e.status_code not in (408, 409):
                    raise TeacherError(f"HTTP {e.status_code} from the teacher: {str(e)[:300]}", attempt) from None
                reason, wait = f"HTTP {e.status_code}: {str(e)[:200]}", retry_after_seconds(e.response)
                self._count_retry(f"http_{e.status_code}")
            except openai.APITimeoutError:
                reason = f"request timed out after {self.client.timeout}s"
                self._count_retry("timeout")
            except openai.APIConnectionError as e:
                reason, connection_errors = f"connection error to {self.base_url}: {str(e)[:200]}", connection_errors + 1
                self._count_retry("connection")
            except (openai.APIResponseValidationError, ValueError) as e:   # malformed body, bad JSON, schema
                reason = f"invalid answer: {str(e)[:300]}"
                self._count_retry("invalid_answer")
            if attempt <= self.max_retries:
                if wait is None:
                    base, cap = self.backoff
                    wait = min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random())
                await asyncio.sleep(min(wait, 600.0))
        if connection_errors == attempt and self.responses == 0:    # never reached the server: stop, fail nothing
            raise FatalTeacherError(f"cannot reach {self.base_url} ({reason}); is the server running?")
        raise TeacherError(f"{reason} (gave up after {attempt} attempts)", attempt)

    async def close(self) -> None:
        await self.client.close()


class TransformersTeacher:
    """A local VLM directory generating with the same prompts; the JSON answer is parsed from its text. One item at a
    time (generation runs in a worker thread). No cache: local generation is the cheap path."""

    name = "transformers"

    def __init__(self, model_dir: str, max_tokens: int = 512, temperature: float = 0.0, max_retries: int = 1,
                 seed: int = 0, log=print):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not model_dir or not Path(model_dir).is_dir():
            raise ConfigError(f"--model must be a local model directory for --teacher transformers, "
                              f"got '{model_dir}'")
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        self.torch, self.max_tokens, self.temperature = torch, max_tokens, temperature
        self.max_retries, self.seed, self.log = max_retries, seed, log
        self.requests, self.cache_hits, self.retries = 0, 0, {}
        self.lock = asyncio.Lock()

    def _generate(self, system: str, user: str, image: bytes | None) -> str:
        import io

        from PIL import Image

        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": user}]
        messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + \
            [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = [Image.open(io.BytesIO(image)).convert("RGB")] if image is not None else None
        inputs = self.processor(text=prompt, images=images, return_tensors="pt")
        self.torch.manual_seed(self.seed + self.requests)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=self.temperature > 0,
                                      temperature=self.temperature if self.temperature > 0 else None)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

    async def ask(self, system: str, user: str, image: bytes | None, schema_cls: type[BaseModel]):
        reason = "no attempt made"
        for attempt in range(1, self.max_retries + 2):
            async with self.lock:
                self.requests += 1
                text = await asyncio.to_thread(self._generate, system, user, image)
            try:
                return validate_answer(schema_cls, text), {"cached": False, "attempts": attempt}
            except ValueError as e:
                reason = f"invalid answer: {e}"
                self.retries["invalid_answer"] = self.retries.get("invalid_answer", 0) + 1
        raise TeacherError(f"{reason} (gave up after {self.max_retries + 1} attempts)", self.max_retries + 1)

    async def close(self) -> None:
        return None
