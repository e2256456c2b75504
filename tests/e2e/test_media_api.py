"""Images and video through a real api_server process with the `openai` SDK.

The server's answers equal the offline LLM.chat path's on the golden prompts (tests/fixtures/multimodal); a
repeated picture hits the prefix cache and the vision-feature cache (metrics); another picture with the same
text reuses no KV block of the first; fetching is SSRF-safe against an HTTP server the test starts on
127.0.0.1; every bad item of issue 13's list is a 400/413 naming the item and the limit, and the server goes on.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from openai import APIStatusError, OpenAI

from e2e.conftest import start_api_server, stop
from multimodal.media_samples import clip_bytes, png_bytes, png_header_only

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "multimodal"
GOLDEN = json.loads((GOLDEN_DIR / "golden_mm_tiny_seed0.json").read_text())
PROMPTS = {p["name"]: p for p in GOLDEN["prompts"]}
PANDA = (GOLDEN_DIR / "panda_256x288.png").read_bytes()
NEW_TOKENS = GOLDEN["new_tokens"]


class _MediaHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/panda.png":
            self._send(200, PANDA)
        elif self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(7)  # past the 5 s image limit
            self._send(200, PANDA)
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(50_000_000))
            self.end_headers()
            try:
                for _ in range(50_000_000 // 65536):
                    self.wfile.write(b"\xff" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self._send(404, b"no such media")

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def media_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _MediaHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


MEDIA_FLAGS = ("--block-size", "32", "--num-kv-blocks", "256", "--max-model-len", "2048",
               "--limit-mm-per-prompt", '{"image": 2, "video": 1}',
               "--media-io-kwargs", '{"video": {"num_frames": 768, "fps": 2}}', "--mm-processor-cache-gb", "1")


@pytest.fixture(scope="module")
def mm_server(tiny_checkpoint, tmp_path_factory):
    server = start_api_server(tiny_checkpoint, tmp_path_factory.mktemp("mm") / "server.log", *MEDIA_FLAGS,
                              "--allowed-local-media-path", str(GOLDEN_DIR))
    yield server
    stop(server)


@pytest.fixture(scope="module")
def trusting_server(tiny_checkpoint, tmp_path_factory):
    """Trusts the host name `localhost` (--allowed-media-domains): its loopback address may be fetched."""
    server = start_api_server(tiny_checkpoint, tmp_path_factory.mktemp("mm_trust") / "server.log", *MEDIA_FLAGS,
                              "--allowed-media-domains", "localhost")
    yield server
    stop(server)


def client_of(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=120)


def image_part(url: str, kind: str = "image_url") -> dict:
    if kind == "input_image":
        return {"type": "input_image", "image_url": url}
    return {"type": kind, kind: {"url": url}}


def golden_messages(name: str, images: list[str] | None = None) -> list[dict]:
    p = PROMPTS[name]
    files = iter(images or p["images"] + p["videos"])
    content = []
    for part in p["messages"][0]["content"]:
        if part["type"] in ("image", "video"):
            kind = "image_url" if part["type"] == "image" else "video_url"
            content.append(image_part((GOLDEN_DIR / next(files)).as_uri(), kind))
        else:
            content.append(part)
    return [{"role": "user", "content": content}]


def chat(client: OpenAI, messages: list[dict], **extra):
    return client.chat.completions.create(
        model=None, messages=messages, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True, **extra}
    )


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def refusal(client: OpenAI, content: list[dict], **extra) -> APIStatusError:
    with pytest.raises(APIStatusError) as info:
        chat(client, [{"role": "user", "content": content}], **extra)
    return info.value


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    from s1serve import LLM, SamplingParams

    llm = LLM(str(tiny_checkpoint), dtype="float32", block_size=32, num_kv_blocks=256,
              allowed_local_media_path=str(GOLDEN_DIR))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return lambda messages: llm.chat(messages, params, use_tqdm=False)[0]


@pytest.mark.parametrize("name", ["one_image", "two_images", "video"])
def test_server_equals_offline_on_golden_prompts(mm_server, offline, name):
    response = chat(client_of(mm_server), golden_messages(name))
    local = offline(golden_messages(name))
    assert local.token_ids == PROMPTS[name]["greedy_ids"]
    assert response.usage.prompt_tokens == PROMPTS[name]["prompt_len"]
    assert response.usage.completion_tokens == NEW_TOKENS
    assert response.choices[0].message.content == local.text


def test_input_image_part_and_data_url(mm_server, offline):
    data_url = "data:image/png;base64," + base64.b64encode(PANDA).decode()
    messages = [{"role": "user", "content": [image_part(data_url, "input_image"),
                                             {"type": "text", "text": "What animal is in this picture?"}]}]
    response = chat(client_of(mm_server), messages)
    assert response.choices[0].message.content == offline(golden_messages("one_image")).text


def test_repeated_picture_hits_both_caches_other_picture_reuses_no_block(mm_server):
    """Two pictures no other test sends, of one size (equal pad ids): the second reuses nothing of the first;
    the first again reuses its KV blocks, and the pads of its last (recomputed) block come from the feature
    cache."""
    client = client_of(mm_server)
    queries, hits = metric(mm_server, "s1serve_mm_cache_queries"), metric(mm_server, "s1serve_mm_cache_hits")
    hit_tokens = metric(mm_server, "s1serve_prefix_cache_hit_tokens")
    text = {"type": "text", "text": "What animal is in this picture?"}
    first_messages = [{"role": "user", "content": [image_part(data_url("image/png", png_bytes(256, 288, 11))), text]}]
    other_messages = [{"role": "user", "content": [image_part(data_url("image/png", png_bytes(256, 288, 12))), text]}]

    first = chat(client, first_messages)
    assert (metric(mm_server, "s1serve_mm_cache_queries"), metric(mm_server, "s1serve_mm_cache_hits")) == (queries + 1, hits)
    other = chat(client, other_messages)
    assert other.usage.prompt_tokens == first.usage.prompt_tokens  # same pad ids, other picture
    assert metric(mm_server, "s1serve_mm_cache_hits") == hits, "the other picture's features came from the cache"
    # The picture starts in the first 32-token block: no block of this prompt may come from the first request.
    assert metric(mm_server, "s1serve_prefix_cache_hit_tokens") == hit_tokens, "the first picture's KV blocks were reused"
    assert other.choices[0].message.content != first.choices[0].message.content

    again = chat(client, first_messages)
    cached = (first.usage.prompt_tokens - 1) // 32 * 32  # all full blocks but the one holding the last token
    assert metric(mm_server, "s1serve_prefix_cache_hit_tokens") == hit_tokens + cached
    assert metric(mm_server, "s1serve_mm_cache_hits") == hits + 1  # the last block's pads: features from the cache
    assert again.choices[0].message.content == first.choices[0].message.content


def test_loopback_fetch_refused_by_default(mm_server, media_host):
    error = refusal(client_of(mm_server), [image_part(f"http://127.0.0.1:{media_host}/panda.png")])
    assert error.status_code == 400
    assert "image 1: host '127.0.0.1' resolves to non-public address 127.0.0.1; refused" in error.message


def test_trusted_host_fetched_redirect_to_refused_address_refused(trusting_server, media_host, offline):
    client = client_of(trusting_server)
    url = f"http://localhost:{media_host}/panda.png"
    response = chat(client, [{"role": "user", "content": [image_part(url),
                                                          {"type": "text", "text": "What animal is in this picture?"}]}])
    assert response.choices[0].message.content == offline(golden_messages("one_image")).text
    for target in (f"http://127.0.0.1:{media_host}/panda.png", "http://169.254.169.254/latest/meta-data/"):
        error = refusal(client, [image_part(f"http://localhost:{media_host}/redirect?to={target}")])
        assert error.status_code == 400 and "is not in --allowed-media-domains" in error.message
    error = refusal(client, [image_part(f"http://localhost:{media_host}/missing.png")])
    assert error.status_code == 400 and "answered HTTP 404" in error.message
    error = refusal(client, [image_part(f"http://localhost:{media_host}/big")])
    assert error.status_code == 413 and "the limit is 20971520 bytes" in error.message
    error = refusal(client, [image_part(f"http://localhost:{media_host}/slow")])
    assert error.status_code == 400 and "took longer than the limit of 5 s" in error.message


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


BAD_INPUTS = [
    ("corrupt png", [image_part(data_url("image/png", PANDA[:40] + b"\0" * 400))], 400, "image 1"),
    ("truncated mp4", [image_part(data_url("video/mp4", clip_bytes(40)[:3000]), "video_url")], 400, "video 1"),
    ("1x1 image", [image_part(data_url("image/png", png_bytes(1, 1)))], 400, "image 1"),
    ("100000x1 strip", [image_part(data_url("image/png", png_bytes(100_000, 1)))], 400, "aspect ratio"),
    ("decompression bomb", [image_part(data_url("image/png", png_header_only(30_000, 30_000)))], 413, "image 1"),
    ("file outside the allowed path", [image_part("file:///etc/passwd")], 400, "outside the allowed local media path"),
    ("unknown part type", [{"type": "audio_url", "audio_url": {"url": "data:,x"}}], 400, "unknown type 'audio_url'"),
    ("three images, limit 2", [image_part((GOLDEN_DIR / "panda_256x288.png").as_uri())] * 3, 413,
     "at most 2 allowed (--limit-mm-per-prompt)"),
    ("part without a URL", [{"type": "image_url", "image_url": {}}], 400, "image 1"),
]


def test_bad_inputs_are_refused_naming_item_and_limit_and_server_goes_on(mm_server, offline):
    client = client_of(mm_server)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    queries = metric(mm_server, "s1serve_mm_cache_queries")
    for what, content, status, needle in BAD_INPUTS:
        error = refusal(client, content)
        assert error.status_code == status, (what, error.message)
        assert needle in error.message, (what, error.message)
    error = refusal(client, golden_messages("video")[0]["content"], mm_processor_kwargs={"fps": 2, "num_frames": 4})
    assert error.status_code == 400 and "fps" in error.message and "num_frames" in error.message
    assert metric(mm_server, "s1serve_mm_cache_queries") == queries, "a refused item reached the engine"
    assert set(os.listdir(tempfile.gettempdir())) - tmp_before == set()
    assert httpx.get(f"{mm_server.base_url}/health").status_code == 200
    response = chat(client, golden_messages("one_image"))
    assert response.choices[0].message.content == offline(golden_messages("one_image")).text


def test_text_only_checkpoint_answers_media_with_400(tmp_path):
    from s1serve.checkpoint.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "text_only", preset="tiny", seed=0, arch="qwen3_moe")
    server = start_api_server(checkpoint, tmp_path / "server.log", "--num-kv-blocks", "64", "--block-size", "16")
    try:
        error = refusal(client_of(server), [image_part(data_url("image/png", PANDA))])
        assert error.status_code == 400 and "no vision tower" in error.message and "image 1" in error.message
        text = chat(client_of(server), [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        assert text.usage.completion_tokens == NEW_TOKENS
    finally:
        stop(server)
