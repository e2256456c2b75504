"""Media fetching against a real HTTP server the test starts on 127.0.0.1 (loopback only), data: and file://.

Loopback is exactly what the default policy must refuse, so the server is reached only through the allow-list
or the allow-private flag; the refusals below are what an attacker pointing the server at internal services
would get.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import fixture_bytes
from s1serve.multimodal.errors import MediaError
from s1serve.multimodal.fetch import FetchLimits, FetchPolicy, MediaFetcher, is_public_address

PANDA = fixture_bytes("panda.jpg")
BIG = 50 * 1000 * 1000


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        path = self.path
        if path == "/panda.jpg":
            self._send(200, PANDA)
        elif path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", path.split("=", 1)[1])
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif path == "/slow":
            time.sleep(3)
            self._send(200, PANDA)
        elif path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(BIG))
            self.end_headers()
            self._stream(BIG)
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._stream(BIG, chunked=True)
        else:
            self._send(404, b"no such media")

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test)

    def _stream(self, total: int, chunked: bool = False) -> None:
        block = b"\xff" * 65536
        try:
            for _ in range(total // len(block)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading at its cap: what the test wants


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fetch(policy: FetchPolicy, url: str, kind: str = "image", label: str = "image 1"):
    return asyncio.run(MediaFetcher(policy).fetch(url, kind, label))


def refused(policy: FetchPolicy, url: str, kind: str = "image", label: str = "image 1") -> MediaError:
    with pytest.raises(MediaError) as info:
        fetch(policy, url, kind, label)
    return info.value


def test_loopback_refused_by_default(server):
    error = refused(FetchPolicy(), f"http://{server}/panda.jpg", label="image 2")
    assert error.status == 400
    assert error.message.startswith("image 2: host '127.0.0.1' resolves to non-public address 127.0.0.1; refused")
    port = server.split(":")[1]
    error = refused(FetchPolicy(), f"http://localhost:{port}/panda.jpg")
    assert "host 'localhost' resolves to non-public address" in error.message


def test_allowed_with_flag_or_allow_list(server):
    item = fetch(FetchPolicy(allow_private_addresses=True), f"http://{server}/panda.jpg")
    assert item.data == PANDA and item.kind == "image" and len(item.content_hash) == 64
    port = server.split(":")[1]
    item = fetch(FetchPolicy(allowed_domains=frozenset({"LocalHost."})), f"http://localhost:{port}/panda.jpg")
    assert item.data == PANDA


def test_allow_list_refuses_other_hosts(server):
    error = refused(FetchPolicy(allowed_domains=frozenset({"media.example.org"})), f"http://{server}/panda.jpg")
    assert error.status == 400 and "host '127.0.0.1' is not in --allowed-media-domains" in error.message


def test_redirect_to_a_refused_address_is_refused(server):
    port = server.split(":")[1]
    trusted = FetchPolicy(allowed_domains=frozenset({"localhost"}))
    for target in ("http://169.254.169.254/latest/meta-data/", f"http://127.0.0.1:{port}/panda.jpg"):
        error = refused(trusted, f"http://localhost:{port}/redirect?to={target}")
        assert "is not in --allowed-media-domains" in error.message
    # With the flag the same redirect is followed (the check runs on every hop, not only the first).
    item = fetch(FetchPolicy(allow_private_addresses=True), f"http://{server}/redirect?to=/panda.jpg")
    assert item.data == PANDA
    error = refused(FetchPolicy(allow_private_addresses=True), f"http://{server}/redirect?to=file:///etc/passwd")
    assert "redirected to a non-http(s) URL" in error.message
    error = refused(FetchPolicy(allow_private_addresses=True), f"http://{server}/loop")
    assert "more than 5 redirects" in error.message


def test_timeout(server):
    policy = FetchPolicy(allow_private_addresses=True, limits={"image": FetchLimits(max_bytes=2**20, timeout_s=0.5)})
    started = time.perf_counter()
    error = refused(policy, f"http://{server}/slow")
    assert time.perf_counter() - started < 2.5
    assert error.status == 400 and "took longer than the limit of 0.5 s" in error.message


def test_not_found(server):
    error = refused(FetchPolicy(allow_private_addresses=True), f"http://{server}/missing.jpg", label="image 3")
    assert error.status == 400 and error.message.startswith("image 3: ") and "answered HTTP 404" in error.message


@pytest.mark.parametrize(
    "path, message",
    [("/big-declared", "is 50000000 bytes; the limit is 20971520 bytes"), ("/big-chunked", "over the limit of 20971520 bytes")],
)
def test_fifty_megabytes_refused(server, path, message):
    error = refused(FetchPolicy(allow_private_addresses=True), f"http://{server}{path}")
    assert error.status == 413 and error.message.startswith("image 1: ") and message in error.message


def test_other_schemes_refused():
    for url in ("ftp://example.org/a.png", "gopher://example.org/", "javascript:alert(1)"):
        assert "is not allowed; use http(s)://, data: or file://" in refused(FetchPolicy(), url).message


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True),
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
        ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
        ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
    ],
)
def test_address_classes(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_literal_metadata_address_refused_without_connecting():
    error = refused(FetchPolicy(), "http://169.254.169.254/latest/meta-data/")
    assert "non-public address 169.254.169.254" in error.message


def test_data_urls():
    encoded = base64.b64encode(PANDA).decode()
    assert fetch(FetchPolicy(), f"data:image/jpeg;base64,{encoded}").data == PANDA
    assert "not valid base64" in refused(FetchPolicy(), "data:image/png;base64,@@@").message
    policy = FetchPolicy(limits={"image": FetchLimits(max_bytes=1000, timeout_s=5)})
    error = refused(policy, f"data:image/jpeg;base64,{encoded}")
    assert error.status == 413 and "the limit is 1000 bytes" in error.message


def test_file_urls(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "panda.jpg").write_bytes(PANDA)
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", root / "link.jpg")
    policy = FetchPolicy(allowed_local_media_path=root)
    assert fetch(policy, f"file://{root}/panda.jpg").data == PANDA
    for url in (f"file://{tmp_path}/secret.txt", f"file://{root}/../secret.txt", f"file://{root}/link.jpg"):
        error = refused(policy, url)
        assert error.status == 400 and "is outside the allowed local media path" in error.message
    assert "no --allowed-local-media-path" in refused(FetchPolicy(), f"file://{root}/panda.jpg").message
    assert "no such file" in refused(policy, f"file://{root}/missing.jpg").message
    small = FetchPolicy(allowed_local_media_path=root, limits={"image": FetchLimits(max_bytes=1000, timeout_s=5)})
    assert refused(small, f"file://{root}/panda.jpg").status == 413
