import json
import os
import subprocess
import sys

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


def test_generate_and_demo(tiny_checkpoint, tmp_path):
    result = run("generate", str(tiny_checkpoint), "--prompt", "Hello", "--max-tokens", "4", "--temperature", "0", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    demo = run("serve-demo", "--max-tokens", "3", env={**ENV, "S1SERVE_CACHE": str(tmp_path / "cache")})
    assert demo.returncode == 0, demo.stderr
    assert "finish_reason=" in demo.stdout and (tmp_path / "cache" / "demo-tiny-seed0" / "config.json").is_file()
