"""A small real OpenAI-compatible chat server that answers from a script.

Tests and `make demo` use it to exercise the HTTP client end to end without a GPU: real sockets,
real JSON, and the failures real servers produce (429, 500, slow answers, malformed bodies, a
server that dies in the middle of a job). It runs stdlib `http.server` in a thread on
127.0.0.1 and a free port; use it as a context manager so it always stops.

    with ScriptedChatServer(responder=lambda body: Reply(content="A dog runs.")) as server:
        config = CaptionConfig(base_url=server.base_url, model="scripted")
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np


@dataclass
class Reply:
    """What the server does with one request.

    content:   assistant text for a 200 chat completion
    status:    HTTP status; non-200 sends `content` (or a JSON error) as the body
    raw_body:  bytes sent verbatim instead of a chat completion (malformed responses)
    delay_s:   seconds to wait before answering (timeouts, throughput)
    drop:      close the connection without answering (a crashed worker)
    headers:   extra response headers (e.g. Retry-After)
    """

    content: str = ""
    status: int = 200
    raw_body: bytes | None = None
    delay_s: float = 0.0
    drop: bool = False
    headers: dict[str, str] = field(default_factory=dict)


Responder = Callable[[dict[str, Any]], Reply]


def completion_body(content: str, model: str = "scripted") -> bytes:
    """A minimal but complete OpenAI chat-completion response body."""
    return json.dumps(
        {
            "id": "chatcmpl-scripted",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
    ).encode()


def request_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a request body (string or content parts)."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


def request_images(body: dict[str, Any]) -> list[np.ndarray]:
    """Decode the base64 JPEG frames of a request body back to (H, W, 3) uint8 RGB."""
    images = []
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return images
    for part in content:
        if part.get("type") != "image_url":
            continue
        url = part["image_url"]["url"]
        raw = base64.b64decode(url.split(",", 1)[1])
        bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        images.append(bgr[:, :, ::-1].copy())
    return images


class ScriptedChatServer:
    """OpenAI-compatible `/v1/chat/completions` on 127.0.0.1:<free port>, answers scripted.

    Replies come first from `script` (a queue filled by `push`), then from `responder(body)`.
    `die_after(n)` makes the server stop for good after answering n more requests: in-flight
    and later requests get their connection closed, new connections are refused.
    Every received request body is kept in `requests` (for asserting what the client sent).
    """

    def __init__(self, responder: Responder | None = None, model: str = "scripted") -> None:
        self.responder = responder or (lambda body: Reply(content="ok"))
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.headers: list[
            dict[str, str]
        ] = []  # request headers (lower-case names), same order as `requests`
        self.in_flight = 0
        self.max_in_flight = 0  # most requests being answered at once (concurrency limits)
        self.script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._answers_left: int | None = None
        self._dead = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def push(self, *replies: Reply) -> None:
        """Queue replies answered, in order, before the responder is consulted."""
        with self._lock:
            self.script.extend(replies)

    def die_after(self, num_answers: int) -> None:
        """Answer `num_answers` more requests, then stop as if the process had crashed."""
        with self._lock:
            self._answers_left = num_answers

    def start(self) -> ScriptedChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM serves
            timeout = 5  # idle keep-alive connections close, so threads end after a test
            # Headers and body go out in two writes; with Nagle on, the client's delayed ACK
            # adds ~40 ms to every response and the benchmark would measure that, not the client.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test output stays readable

            def do_POST(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._dead.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def __enter__(self) -> ScriptedChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------

    def _next_reply(self, body: dict[str, Any]) -> Reply | None:
        """The reply for this request, or None when the server has died."""
        with self._lock:
            if self._dead.is_set():
                return None
            if self._answers_left is not None:
                if self._answers_left <= 0:
                    self._die_locked()
                    return None
                self._answers_left -= 1
            scripted = self.script.popleft() if self.script else None
        return scripted if scripted is not None else self.responder(body)

    def _die_locked(self) -> None:
        self._dead.set()
        httpd = self._httpd
        if httpd is not None:
            # shutdown() waits for serve_forever, so it must not run on a handler thread's stack
            # while holding the lock; a helper thread closes the listening socket.
            threading.Thread(target=lambda: (httpd.shutdown(), httpd.server_close())).start()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", 0))
        raw = handler.rfile.read(length)
        if handler.path.rstrip("/") != "/v1/chat/completions":
            self._send(handler, 404, b'{"error": "not found"}', {})
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send(handler, 400, b'{"error": "request body is not JSON"}', {})
            return
        with self._lock:
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in handler.headers.items()})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = self._next_reply(body)
            if reply is not None and reply.delay_s:
                time.sleep(reply.delay_s)
        finally:
            with self._lock:
                self.in_flight -= 1
        if reply is None or reply.drop:
            handler.close_connection = True
            handler.connection.close()  # the client sees the link drop with no response
            return
        if reply.raw_body is not None:
            payload = reply.raw_body
        elif reply.status == 200:
            payload = completion_body(reply.content, self.model)
        else:
            payload = json.dumps({"error": {"message": reply.content or "scripted error"}}).encode()
        self._send(handler, reply.status, payload, reply.headers)

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str]
    ) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            for k, v in headers.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this request (its timeout): nothing left to send to


def measure_throughput(
    concurrency: int, num_requests: int = 200, delay_s: float = 0.02, image_side: int = 64
) -> float:
    """Requests per second of `OpenAIBackend` against this server with a fixed answer delay.

    Each request carries one `image_side` x `image_side` frame, like a DSG verification call.
    """
    from data_engine.captioning.backends import BackendConfig, ChatRequest, OpenAIBackend

    frame = np.random.default_rng(0).integers(0, 255, (image_side, image_side, 3), dtype=np.uint8)
    requests = [ChatRequest("Is there a dog?", (frame,), max_tokens=4)] * num_requests
    with ScriptedChatServer(responder=lambda body: Reply(content="yes", delay_s=delay_s)) as srv:
        config = BackendConfig(base_url=srv.base_url, model="scripted", max_concurrency=concurrency)
        backend = OpenAIBackend(config)
        try:
            backend.complete(requests[: 2 * concurrency])  # warm up connections
            t0 = time.perf_counter()
            replies = backend.complete(requests)
            elapsed = time.perf_counter() - t0
        finally:
            backend.close()
    if not all(r.ok for r in replies):
        raise RuntimeError(f"throughput run had failures: {[r.error for r in replies if r.error]}")
    return num_requests / elapsed


if __name__ == "__main__":
    for c in (1, 8):
        print(f"concurrency {c}: {measure_throughput(c):.1f} requests/s (server delay 20 ms)")
