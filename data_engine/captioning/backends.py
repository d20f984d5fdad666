"""Chat backends shared by the captioner and both DSG-Video roles.

A backend answers a list of `ChatRequest`s (a text prompt plus zero or more RGB frames) with one
`ChatReply` per request, in order. A request that fails after its retries comes back as a reply
with `error` set, never as made-up text, so the stage can record the failure on that clip.

Two real backends:
- `OpenAIBackend`: an OpenAI-compatible `/v1/chat/completions` server (vLLM, SGLang), frames
  sent as base64 JPEG `image_url` parts, requests in flight bounded by `max_concurrency`,
  per-request timeout, retries with exponential back-off and jitter on 408/429/5xx, connection
  errors and timeouts.
- `LocalBackend`: a transformers vision-language model loaded from a local directory
  (AutoProcessor + AutoModelForImageTextToText), batched greedy `generate`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import cv2
import httpx
import numpy as np

from data_engine.stages.base import StageError

BACKENDS = ("openai", "local")
JPEG_QUALITY = 90  # high enough that a VLM sees no block artefacts, ~10x smaller than PNG
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Statuses that mean the settings are wrong (key, URL, model name): every request would fail the
# same way, so the batch stops with a StageError instead of quarantining every clip.
FATAL_STATUS = frozenset({401, 403, 404})


# ----------------------------------------------------------------------------- config


@dataclass
class BackendConfig:
    """Settings shared by the `caption`, `dsg_questions` and `dsg_verify` config sections."""

    section: ClassVar[str] = "backend"
    extra_backends: ClassVar[tuple[str, ...]] = ()  # section-specific sources beyond the models

    backend: str = "openai"  # "openai" (OpenAI-compatible server) | "local" (transformers dir)
    base_url: str = "http://127.0.0.1:8000/v1"  # openai: server root ending in /v1
    model: str = ""  # openai: model name the server serves (vLLM's --served-model-name)
    api_key_env: str = ""  # openai: name of the env var holding the API key; "" = no key sent
    max_concurrency: int = 8  # openai: requests in flight at once per stage actor
    timeout_s: float = 120.0  # openai: seconds allowed for one HTTP request
    max_retries: int = 4  # openai: extra attempts after a 408/429/5xx, timeout or dropped link
    retry_backoff_s: float = 0.5  # openai: first back-off in seconds, doubled each retry
    retry_backoff_max_s: float = 30.0  # openai: cap on one back-off in seconds
    batch_size: int = 8  # clips per stage call; local: requests per generate() call
    model_path: str = ""  # local: directory holding config, weights and processor
    device: str = "auto"  # local: "auto" (cuda when present) | "cpu" | "cuda" | "cuda:N"
    temperature: float = 0.0  # sampling temperature; 0 = greedy (reproducible)

    def __post_init__(self) -> None:
        s = self.section
        if self.backend not in (*BACKENDS, *self.extra_backends):
            raise ValueError(f"{s}.backend: must be one of {BACKENDS}, got {self.backend!r}")
        # `model` / `model_path` may stay empty here so that a config whose stage does not run
        # still loads; the backend refuses to start without them (StageError naming the key).
        if self.backend == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"{s}.base_url: must start with http:// or https://")
        if self.max_concurrency < 1:
            raise ValueError(f"{s}.max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"{s}.timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"{s}.max_retries: must be >= 0, got {self.max_retries}")
        if self.retry_backoff_s < 0 or self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError(f"{s}.retry_backoff_s: must be in [0, retry_backoff_max_s]")
        if self.batch_size < 1:
            raise ValueError(f"{s}.batch_size: must be >= 1, got {self.batch_size}")
        if self.temperature < 0:
            raise ValueError(f"{s}.temperature: must be >= 0, got {self.temperature}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"{s}.device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ChatRequest:
    """One chat turn: the frames (each (H, W, 3) uint8 RGB) come before the text prompt."""

    prompt: str
    images: tuple[np.ndarray, ...] = ()
    max_tokens: int = 256
    temperature: float = 0.0
    system: str | None = None


@dataclass
class ChatReply:
    """The assistant's text, or `error` saying why there is none after all attempts."""

    text: str | None
    error: str | None = None
    attempts: int = 1
    time_s: float = 0.0  # wall seconds spent on this request, retries and back-off included

    @property
    def ok(self) -> bool:
        return self.error is None


class ChatBackend(Protocol):
    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        """One reply per request, same order. Raises StageError only when the settings are wrong."""
        ...

    def identity(self) -> dict[str, Any]:
        """Backend kind and model identity, stored as provenance."""
        ...

    def close(self) -> None: ...


def text_hash(text: str) -> str:
    """Short stable hash of a prompt, stored so captions from different prompts never mix."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- OpenAI


def encode_jpeg_data_url(frame: np.ndarray) -> str:
    """(H, W, 3) uint8 RGB -> "data:image/jpeg;base64,..." for an `image_url` content part."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    ok, buf = cv2.imencode(
        ".jpg", np.ascontiguousarray(frame[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def chat_body(model: str, request: ChatRequest) -> dict[str, Any]:
    """The JSON body of one `/v1/chat/completions` request."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    if request.images:
        content: Any = [
            {"type": "image_url", "image_url": {"url": encode_jpeg_data_url(img)}}
            for img in request.images
        ]
        content.append({"type": "text", "text": request.prompt})
    else:
        content = request.prompt
    messages.append({"role": "user", "content": content})
    return {
        "model": model,
        "messages": messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    }


class MalformedResponse(ValueError):
    """The server answered 200 but not with an OpenAI chat completion."""


def parse_chat_response(raw: bytes) -> str:
    """Assistant text from a chat-completion body; MalformedResponse says what is wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedResponse(f"body is not JSON ({exc}): {raw[:200]!r}") from None
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedResponse(f"no choices[0].message.content in {raw[:200]!r}") from None
    if isinstance(content, list):  # some servers return content parts even for text
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise MalformedResponse(f"content parts without text: {raw[:200]!r}")
        content = "".join(texts)
    if not isinstance(content, str):
        raise MalformedResponse(f"message.content is {type(content).__name__}, not a string")
    return content


class OpenAIBackend:
    """Client for an OpenAI-compatible chat-completions server, thread-pool concurrency."""

    def __init__(self, config: BackendConfig) -> None:
        s = config.section
        self.config = config
        if not config.model:
            raise StageError(f"{s}.model: required when {s}.backend is 'openai'")
        headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise StageError(
                    f"{s}.api_key_env: environment variable {config.api_key_env} is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        # One connection per concurrent request: keep-alive avoids a TCP handshake per frame.
        limits = httpx.Limits(
            max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
        )
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(config.timeout_s), limits=limits
        )
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix=f"{s}-http")
        self._fatal: str | None = None
        self._lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.config.model, "base_url": self.config.base_url}

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        self._fatal = None
        replies = list(self._pool.map(self._complete_one, requests))
        if self._fatal is not None:
            raise StageError(self._fatal)
        return replies

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def _backoff_s(self, attempt: int, retry_after: str | None) -> float:
        cfg = self.config
        # Exponential back-off with jitter in [50%, 100%], so actors that failed together
        # (server restart) do not all come back in the same instant.
        delay = min(cfg.retry_backoff_max_s, cfg.retry_backoff_s * 2**attempt)
        delay *= 0.5 + 0.5 * random.random()
        if retry_after is not None:
            # An HTTP-date Retry-After does not parse as seconds: keep our own back-off then.
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), cfg.retry_backoff_max_s))
        return delay

    def _complete_one(self, request: ChatRequest) -> ChatReply:
        s = self.config.section
        t0 = time.perf_counter()
        body = chat_body(self.config.model, request)
        last_error = ""
        attempts = 0
        for attempt in range(self.config.max_retries + 1):
            if self._fatal is not None:  # settings are wrong: don't keep hammering the server
                return ChatReply(None, self._fatal, attempts, time.perf_counter() - t0)
            attempts = attempt + 1
            retry_after = None
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException as exc:
                last_error = f"timed out after {self.config.timeout_s} s ({type(exc).__name__})"
            except httpx.TransportError as exc:  # refused, reset, dropped mid-response
                last_error = f"connection error: {type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        text = parse_chat_response(response.content)
                    except MalformedResponse as exc:
                        # A server that speaks another protocol answers the same way every time:
                        # report it instead of retrying.
                        return ChatReply(
                            None, f"malformed response from {self.url}: {exc}", attempts,
                            time.perf_counter() - t0,
                        )  # fmt: skip
                    return ChatReply(text, None, attempts, time.perf_counter() - t0)
                detail = response.text[:200]
                if status in FATAL_STATUS:
                    key = "api_key_env" if status in (401, 403) else "model"
                    with self._lock:
                        self._fatal = (
                            f"{s}.{key}: server {self.url} answered HTTP {status}: {detail}"
                        )
                    return ChatReply(None, self._fatal, attempts, time.perf_counter() - t0)
                last_error = f"HTTP {status}: {detail}"
                if status not in RETRYABLE_STATUS:
                    return ChatReply(None, last_error, attempts, time.perf_counter() - t0)
                retry_after = response.headers.get("retry-after")
            if attempt < self.config.max_retries:
                time.sleep(self._backoff_s(attempt, retry_after))
        return ChatReply(
            None, f"gave up after {attempts} attempts: {last_error}", attempts,
            time.perf_counter() - t0,
        )  # fmt: skip


# ----------------------------------------------------------------------------- local


def _dir_fingerprint(path: Path) -> str:
    """Hash of weight file names and sizes: cheap, and changes when the checkpoint does."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


class LocalBackend:
    """A transformers vision-language model from a local directory, batched greedy generate."""

    def __init__(self, config: BackendConfig) -> None:
        import torch
        import transformers

        s = config.section
        self.config = config
        if not config.model_path:
            raise StageError(f"{s}.model_path: required when {s}.backend is 'local'")
        path = Path(config.model_path)
        if not path.is_dir():
            raise StageError(f"{s}.model_path: directory not found: {path}")
        if config.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = config.device
        # bf16 on GPUs; the CPU has no fast half precision (docs/design-notes.md "Precision").
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise StageError(f"{s}.model_path: cannot load a processor from {path}: {exc}") from exc
        if getattr(self.processor, "chat_template", None) is None:
            raise StageError(f"{s}.model_path: processor in {path} has no chat template")
        try:
            model_cls: Any = transformers.AutoModelForImageTextToText
            self.model = model_cls.from_pretrained(path, dtype=dtype)
        except ValueError:
            # Not in the image-text-to-text mapping: use the class the checkpoint names.
            arch = (transformers.AutoConfig.from_pretrained(path).architectures or [None])[0]
            model_cls = getattr(transformers, arch or "", None)
            if model_cls is None:
                raise StageError(
                    f"{s}.model_path: {path} is not a vision-language model transformers knows"
                ) from None
            self.model = model_cls.from_pretrained(path, dtype=dtype)
        self.model.to(self.device).eval()
        # Decoder-only batched generation needs left padding, or new tokens follow pad tokens.
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        self._identity = {
            "backend": "local",
            "model": path.name,
            "model_path": str(path.resolve()),
            "model_type": self.model.config.model_type,
            "fingerprint": _dir_fingerprint(path),
            "device": self.device,
            "dtype": str(dtype).removeprefix("torch."),
        }

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def close(self) -> None:
        pass

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        replies: list[ChatReply | None] = [None] * len(requests)
        # Requests batch together only when they share image presence and sampling settings.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((bool(r.images), r.max_tokens, r.temperature, r.system), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.config.batch_size):
                chunk = idx[start : start + self.config.batch_size]
                t0 = time.perf_counter()
                try:
                    texts = self._generate([requests[i] for i in chunk])
                except (
                    Exception
                ) as exc:  # any failure: retry alone to isolate the request that broke it
                    if len(chunk) == 1:
                        replies[chunk[0]] = ChatReply(
                            None, f"generate failed: {type(exc).__name__}: {exc}", 1,
                            time.perf_counter() - t0,
                        )  # fmt: skip
                        continue
                    for i in chunk:
                        replies[i] = self.complete([requests[i]])[0]
                    continue
                per_request_s = (time.perf_counter() - t0) / len(chunk)
                for i, text in zip(chunk, texts):
                    replies[i] = ChatReply(text, None, 1, per_request_s)
        return [r for r in replies if r is not None]

    def _generate(self, batch: list[ChatRequest]) -> list[str]:
        import torch
        from PIL import Image

        texts, images = [], []
        for r in batch:
            content: list[dict[str, Any]] = [{"type": "image"} for _ in r.images]
            content.append({"type": "text", "text": r.prompt})
            messages = [{"role": "user", "content": content}]
            if r.system:
                messages.insert(
                    0, {"role": "system", "content": [{"type": "text", "text": r.system}]}
                )
            texts.append(
                self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
            images.append([Image.fromarray(img) for img in r.images])
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if batch[0].images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sampling: dict[str, Any] = {"do_sample": False}
        if batch[0].temperature > 0:
            sampling = {"do_sample": True, "temperature": batch[0].temperature}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=batch[0].max_tokens, **sampling)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)


def make_backend(config: BackendConfig) -> ChatBackend:
    """The backend `config.backend` names, ready to use (model loaded, client open)."""
    if config.backend == "openai":
        return OpenAIBackend(config)
    return LocalBackend(config)


def config_summary(config: BackendConfig) -> dict[str, Any]:
    """Config fields that change outputs, for provenance (transport settings left out)."""
    keep = ("backend", "model", "model_path", "temperature")
    return {k: v for k, v in asdict(config).items() if k in keep}


__all__ = [
    "BackendConfig",
    "ChatBackend",
    "ChatReply",
    "ChatRequest",
    "LocalBackend",
    "MalformedResponse",
    "OpenAIBackend",
    "chat_body",
    "config_summary",
    "encode_jpeg_data_url",
    "make_backend",
    "parse_chat_response",
    "text_hash",
]


def require_chat(section: str, cfg: BackendConfig) -> None:
    """Raise StageError naming the key when a chat section cannot start (before any work)."""
    if cfg.backend == "sidecar":
        return
    if cfg.backend == "local":
        if not cfg.model_path:
            raise StageError(f"{section}.model_path: required for backend 'local'")
        if not Path(cfg.model_path).is_dir():
            raise StageError(f"{section}.model_path: directory not found: {cfg.model_path}")
    elif not cfg.base_url or not cfg.model:
        raise StageError(f"{section}.base_url/{section}.model: required for backend 'openai'")
