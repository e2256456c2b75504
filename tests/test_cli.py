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


def test_make_tiny_fp8_equals_make_tiny_then_quantize_byte_for_byte(tmp_path, tiny_checkpoint):
    from s1serve.checkpoint.tiny import PRESETS
    from s1serve.cli import main

    shard = str(PRESETS["tiny"]["shard_bytes"])
    assert main(["quantize", str(tiny_checkpoint), str(tmp_path / "quantized"), "--max-shard-size", shard]) == 0
    assert main(["make-tiny", "--out", str(tmp_path / "direct"), "--fp8"]) == 0
    files = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "quantized").iterdir())
    assert sum(name.endswith(".safetensors") for name in files) >= 2
    for name in files:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "quantized" / name).read_bytes(), name


def _tiny_config(d, arch="interns1_pro"):
    from s1serve.checkpoint.tiny import tiny_config

    (d / "config.json").write_text(json.dumps(tiny_config("tiny", arch)))


def _non_float_expert(d):
    import torch
    from safetensors.torch import save_file

    _tiny_config(d, "qwen3_moe")
    save_file({"model.layers.0.mlp.experts.0.up_proj.weight": torch.ones(4, 4, dtype=torch.int8)}, str(d / "model.safetensors"))


@pytest.mark.parametrize(
    "setup, dst_has_file, expected",
    [
        (None, False, "src: not a folder"),
        (lambda d: d.mkdir(), False, "config.json: file not found"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "llama"}')), False, "model_type 'llama' is not supported"),
        (lambda d: (d.mkdir(), _tiny_config(d)), False, "no model.safetensors.index.json or model.safetensors"),
        ("tiny", False, "already quantised (it has a quantization_config)"),
        ("tiny", True, "dst: destination exists and is not an empty folder"),
        (lambda d: (d.mkdir(), _non_float_expert(d)), False, "'model.layers.0.mlp.experts.0.up_proj.weight' is torch.int8; only floating-point"),
    ],
)
def test_quantize_bad_input_is_one_line_error(tmp_path, tiny_checkpoint, capsys, setup, dst_has_file, expected):
    from s1serve.cli import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    if setup == "tiny":
        config = json.loads((tiny_checkpoint / "config.json").read_text())
        if not dst_has_file:
            config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        src.mkdir()
        for path in tiny_checkpoint.iterdir():
            (src / path.name).symlink_to(path)
        (src / "config.json").unlink()
        (src / "config.json").write_text(json.dumps(config))
    elif setup is not None:
        setup(src)
    if dst_has_file:
        dst.mkdir()
        (dst / "x").write_text("")
    assert main(["quantize", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert dst_has_file or not dst.exists(), "nothing is written on bad input"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
