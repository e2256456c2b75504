import json
import os
import subprocess
import sys
import time

import httpx
import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "s1serve", *args], capture_output=True, text=True, env=env or ENV, timeout=300)


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path):
    result = run("make-tiny", "--out", str(tmp_path / "t"), "--preset", "tiny", "--seed", "3")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["model_type"] == "interns1_pro"


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: None, "config.json: file not found"),
        (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "model_type 'llama' is not supported"),
    ],
)
def test_bad_model_folder_is_one_line_error(tmp_path, setup, expected):
    setup(tmp_path)
    result = run("generate", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_generate(tiny_checkpoint):
    result = run("generate", str(tiny_checkpoint), "--prompt", "Hello", "--max-tokens", "4", "--temperature", "0", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_serve_demo_writes_the_demo_checkpoint_and_serves_it(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "S1SERVE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "s1serve", "serve-demo", "--server-name", "127.0.0.1", "--server-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
        else:
            pytest.fail("serve-demo did not answer")
        assert [m["id"] for m in models["data"]] == ["intern-s1-pro-demo"]
        assert (tmp_path / "cache" / "demo-tiny-seed0" / "config.json").is_file()
    finally:
        proc.terminate()
        proc.wait(30)
