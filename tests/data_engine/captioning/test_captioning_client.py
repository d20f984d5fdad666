"""The OpenAI-compatible client and the caption stage against a real scripted HTTP server."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pytest

from data_engine.captioning.backends import BackendConfig, ChatRequest, OpenAIBackend, text_hash
from data_engine.captioning.caption import CaptionConfig, Captioner
from data_engine.frames import ClipFrames
from data_engine.stages.base import StageError
from tests.helpers.chat_server import (
    Reply,
    ScriptedChatServer,
    measure_throughput,
    request_images,
    request_text,
)

FAST_RETRY = {"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05}


def solid_clip(colours: list[tuple[int, int, int]], side: int = 32) -> ClipFrames:
    """A clip whose k-th sampled frame is one flat colour (easy to recognise after JPEG)."""
    frames = np.stack([np.full((side, side, 3), c, np.uint8) for c in colours])
    k = len(colours)
    return ClipFrames(
        frames=frames,
        times_s=np.arange(k, dtype=np.float64) * 0.5,
        pair_frames=np.zeros((0, side, side, 3), np.uint8),
        pair_dt_s=np.zeros(k),
    )


def caption_config(server: ScriptedChatServer, **kw) -> CaptionConfig:
    return CaptionConfig(base_url=server.base_url, model="scripted-vlm", **{**FAST_RETRY, **kw})


def test_request_carries_frames_as_jpeg_parts_and_settings():
    """The server must receive the sampled frames, in order, as base64 JPEG image_url parts
    followed by the prompt; a wrong part type or frame order would caption the wrong thing."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    with ScriptedChatServer(responder=lambda b: Reply(content="A flashing screen.")) as srv:
        stage = Captioner(caption_config(srv, frames_per_clip=3, max_tokens=77, prompt="Go."))
        rows = stage.score_clips([solid_clip(colours)])
        stage.close()
    body = srv.requests[0]
    assert body["model"] == "scripted-vlm" and body["max_tokens"] == 77
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 3 + ["text"]
    assert all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in parts[:3])
    assert request_text(body) == "Go."
    # Evenly spaced over 5 frames: indices 0, 2, 4.
    seen = [img.reshape(-1, 3).mean(0) for img in request_images(body)]
    for got, want in zip(seen, [colours[0], colours[2], colours[4]]):
        np.testing.assert_allclose(got, want, atol=8)
    assert rows[0]["caption"] == "A flashing screen."


def test_caption_rows_match_schema_and_provenance():
    """Rows must have exactly the declared columns (the integrator writes them to Lance with
    `output_schema`) and record backend, model and prompt hash so captions never mix."""
    with ScriptedChatServer(responder=lambda b: Reply(content="  A cat.\n")) as srv:
        stage = Captioner(caption_config(srv))
        rows = stage.score_clips([solid_clip([(9, 9, 9)] * 2), solid_clip([(200, 9, 9)] * 3)])
        stage.close()
    table = pa.Table.from_pylist(rows, schema=Captioner.output_schema)
    assert table.column_names == Captioner.output_schema.names
    assert rows[0]["caption"] == "A cat."  # surrounding whitespace is not part of a caption
    assert rows[0]["caption_backend"] == "openai" and rows[0]["caption_model"] == "scripted-vlm"
    assert rows[0]["caption_prompt_hash"] == stage.prompt_hash and len(stage.prompt_hash) == 16
    assert rows[0]["caption_time_s"] > 0
    prov = json.loads(rows[0]["caption_provenance"])
    assert prov["frames_per_clip"] == 8 and prov["model"] == "scripted-vlm"
    assert stage.prompt_hash != text_hash(stage.config.prompt + " ")  # any edit changes it


def test_retries_429_and_500_then_succeeds():
    """Rate limits and server errors are transient on a busy vLLM: the client must retry with
    back-off and return the real caption, reporting how many attempts it took."""
    with ScriptedChatServer(responder=lambda b: Reply(content="A dog.")) as srv:
        srv.push(Reply(status=429, headers={"Retry-After": "0"}), Reply(status=500))
        backend = OpenAIBackend(BackendConfig(base_url=srv.base_url, model="m", **FAST_RETRY))
        reply = backend.complete([ChatRequest("hi")])[0]
        backend.close()
    assert reply.ok and reply.text == "A dog." and reply.attempts == 3
    assert len(srv.requests) == 3


def test_gives_up_after_max_retries_with_clear_error():
    """A server that keeps failing yields an error reply after exactly max_retries + 1 tries,
    never a made-up answer."""
    with ScriptedChatServer(responder=lambda b: Reply(status=503, content="overloaded")) as srv:
        cfg = BackendConfig(base_url=srv.base_url, model="m", max_retries=2, **FAST_RETRY)
        backend = OpenAIBackend(cfg)
        reply = backend.complete([ChatRequest("hi")])[0]
        backend.close()
    assert not reply.ok and reply.text is None
    assert reply.attempts == 3 and len(srv.requests) == 3
    assert "HTTP 503" in reply.error and "overloaded" in reply.error


def test_timeout_is_retried_then_reported():
    """A hung request must not hang the actor: each attempt stops at timeout_s.

    The server answers after 3 s. Two attempts of 0.2 s end well before one late answer could
    arrive, so the bound (2.5 s) tells "stopped at the timeout" from "waited for the server"
    without depending on how busy the machine is (a 0.9 s bound failed once in CI at 0.95 s).
    """
    with ScriptedChatServer(responder=lambda b: Reply(content="late", delay_s=3.0)) as srv:
        cfg = BackendConfig(
            base_url=srv.base_url, model="m", timeout_s=0.2, max_retries=1, **FAST_RETRY
        )
        backend = OpenAIBackend(cfg)
        t0 = time.perf_counter()
        reply = backend.complete([ChatRequest("hi")])[0]
        elapsed = time.perf_counter() - t0
        backend.close()
    assert not reply.ok and "timed out" in reply.error and reply.attempts == 2
    assert elapsed < 2.5


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b'{"choices": []}', "no choices"),
        (b'{"choices": [{"message": {"content": null}}]}', "not a string"),
    ],
)
def test_malformed_response_is_a_clear_error_not_retried(raw, why):
    """A 200 that is not a chat completion (proxy page, wrong API) is reported with what was
    wrong; retrying would get the same answer, so it is not retried."""
    with ScriptedChatServer() as srv:
        srv.push(Reply(raw_body=raw))
        backend = OpenAIBackend(BackendConfig(base_url=srv.base_url, model="m", **FAST_RETRY))
        reply = backend.complete([ChatRequest("hi")])[0]
        backend.close()
    assert not reply.ok and "malformed response" in reply.error and why in reply.error
    assert len(srv.requests) == 1


def test_unauthorized_stops_the_batch_naming_the_key_setting(monkeypatch):
    """A wrong key fails every request the same way: raise a StageError that names the config
    key instead of quarantining every clip; the key itself is sent as a Bearer token."""
    monkeypatch.setenv("STIV_TEST_KEY", "sk-secret")
    with ScriptedChatServer(responder=lambda b: Reply(status=401, content="bad key")) as srv:
        stage = Captioner(caption_config(srv, api_key_env="STIV_TEST_KEY"))
        with pytest.raises(StageError, match=r"caption\.api_key_env: .*401"):
            stage.score_clips([solid_clip([(1, 2, 3)])])
        stage.close()
    assert srv.headers[0]["authorization"] == "Bearer sk-secret"


def test_defaults_load_and_missing_model_fails_at_start():
    """Default sections must load (a config may omit a stage it does not run), but starting an
    openai or local stage without a model must fail at once, naming the key."""
    CaptionConfig()
    with pytest.raises(StageError, match=r"caption\.model: required"):
        Captioner(CaptionConfig())
    with pytest.raises(StageError, match=r"caption\.model_path: required"):
        Captioner(CaptionConfig(backend="local"))


def test_missing_api_key_env_fails_at_start(monkeypatch):
    """A configured key variable that is not set must fail before any work, naming the key."""
    monkeypatch.delenv("STIV_TEST_KEY", raising=False)
    with pytest.raises(StageError, match=r"caption\.api_key_env: .*STIV_TEST_KEY"):
        Captioner(CaptionConfig(model="m", api_key_env="STIV_TEST_KEY"))


def test_concurrency_limit_is_respected():
    """max_concurrency bounds the requests in flight (a shared vLLM must not be flooded by
    every actor), and the limit is actually used (requests overlap)."""
    with ScriptedChatServer(responder=lambda b: Reply(content="x", delay_s=0.05)) as srv:
        cfg = BackendConfig(base_url=srv.base_url, model="m", max_concurrency=3)
        backend = OpenAIBackend(cfg)
        replies = backend.complete([ChatRequest(f"q{i}") for i in range(12)])
        backend.close()
    assert all(r.ok for r in replies)
    assert len(srv.requests) == 12 and srv.max_in_flight <= 3
    assert srv.max_in_flight >= 2


def test_replies_keep_request_order_under_concurrency():
    """Replies must line up with requests even when later requests finish first."""

    def echo_slow_first(body):
        text = request_text(body)
        return Reply(content=f"echo {text}", delay_s=0.1 if text == "0" else 0.0)

    with ScriptedChatServer(responder=echo_slow_first) as srv:
        backend = OpenAIBackend(BackendConfig(base_url=srv.base_url, model="m", max_concurrency=4))
        replies = backend.complete([ChatRequest(str(i)) for i in range(8)])
        backend.close()
    assert [r.text for r in replies] == [f"echo {i}" for i in range(8)]


def test_server_dying_mid_job_loses_nothing():
    """When the server dies after 3 answers, the 3 captioned clips keep their captions and the
    others come back as errors for quarantine: never a fake caption, never a lost clip."""
    clips = [solid_clip([(10 * i, 0, 0)] * 2) for i in range(6)]
    with ScriptedChatServer(responder=lambda b: Reply(content="A red screen.")) as srv:
        srv.die_after(3)
        stage = Captioner(caption_config(srv, max_concurrency=1, max_retries=2))
        rows = stage.score_clips(clips)
        stage.close()
    assert len(rows) == 6
    assert [r.get("caption") for r in rows[:3]] == ["A red screen."] * 3
    for row in rows[3:]:
        assert set(row) == {"error"}
        assert "gave up after 3 attempts" in row["error"] and "connection error" in row["error"]


def test_empty_caption_and_frameless_clip_are_errors():
    """An empty answer or a clip without frames must be an error entry, not an empty caption
    stored as if it were real."""
    with ScriptedChatServer(responder=lambda b: Reply(content="   ")) as srv:
        stage = Captioner(caption_config(srv))
        empty = ClipFrames(
            np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0), np.zeros((0, 8, 8, 3), np.uint8),
            np.zeros(0),
        )  # fmt: skip
        rows = stage.score_clips([solid_clip([(0, 0, 0)]), empty])
        stage.close()
    assert rows[0] == {"error": "caption: model returned an empty caption"}
    assert rows[1] == {"error": "caption: clip has no sampled frames"}
    assert len(srv.requests) == 1  # the frameless clip never reached the server


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"backend": "grpc"}, r"caption\.backend"),
        ({"base_url": "localhost:8000"}, r"caption\.base_url"),
        ({"max_concurrency": 0}, r"caption\.max_concurrency"),
        ({"timeout_s": 0}, r"caption\.timeout_s"),
        ({"frames_per_clip": 0}, r"caption\.frames_per_clip"),
        ({"max_tokens": 0}, r"caption\.max_tokens"),
        ({"device": "tpu"}, r"caption\.device"),
    ],
)
def test_config_validation_names_the_field(kw, match):
    """A bad setting fails at config load with `<section>.<field>: <problem>`."""
    with pytest.raises(ValueError, match=match):
        CaptionConfig(**{"model": "m", **kw})


def test_throughput_scales_with_concurrency():
    """Concurrency is the client's whole point against a batching server: with a fixed 20 ms
    server delay, 8 requests in flight must be several times faster than 1."""
    rps_1 = measure_throughput(concurrency=1, num_requests=40, delay_s=0.02)
    rps_8 = measure_throughput(concurrency=8, num_requests=160, delay_s=0.02)
    print(f"client throughput: c=1 {rps_1:.1f} req/s, c=8 {rps_8:.1f} req/s (20 ms delay)")
    assert rps_1 < 50.5  # cannot beat the server delay
    assert rps_8 > 3 * rps_1
