"""The deployment guide's three command-line dialects map onto the api_server flags; parsing rules of every
s1serve command (no abbreviations, defaults in --help, the failing command's usage); checks before any rank starts.

The command lines below are the guide's (Intern-S1-Pro deployment_guide.md) with only MODEL, node addresses and
ports named; sizes as the guide has them (parsing starts nothing)."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

import pytest

from s1serve.entrypoints import cli

MODEL = "/models/Intern-S1-Pro"
NODE0 = "10.0.0.1"
MEDIA = '{"video": {"num_frames": 768, "fps": 2}}'

VLLM_TP = (
    f"{MODEL} --tensor-parallel-size 16 --enable-expert-parallel --distributed-executor-backend ray "
    "--max-model-len 65536 --trust-remote-code --reasoning-parser deepseek_r1 --enable-auto-tool-choice "
    "--tool-call-parser hermes"
)
VLLM_DP = (
    f"{MODEL} --all2all-backend deepep_low_latency --tensor-parallel-size 1 --enable-expert-parallel "
    f"--data-parallel-size 16 --data-parallel-size-local 8 @start@--data-parallel-address {NODE0} "
    f"--data-parallel-rpc-port 13345 --gpu_memory_utilization 0.8 --mm_processor_cache_gb=0 "
    f"--media-io-kwargs '{MEDIA}' --max-model-len 65536 --trust-remote-code @tail@ "
    "--reasoning-parser deepseek_r1 --enable-auto-tool-choice --tool-call-parser hermes"
)
VLLM_DP_NODE0 = VLLM_DP.replace("@start@", "").replace("@tail@", "--api-server-count=8")
VLLM_DP_NODE1 = VLLM_DP.replace("@start@", "--data-parallel-start-rank 8 ").replace("@tail@", "--headless")
SGLANG = (
    f"--model-path {MODEL} --tp 16 --ep 16 --mem-fraction-static 0.85 --trust-remote-code "
    f"--dist-init-addr {NODE0}:5000 --nnodes 2 --attention-backend fa3 --mm-attention-backend fa3 "
    "--keep-mm-feature-on-device --node-rank {rank} --reasoning-parser qwen3 --tool-call-parser qwen"
)

PARALLEL = ("tp", "ep", "dp", "nnodes", "node_rank", "dist_init_addr", "headless", "distributed_executor_backend")
COMMON = {"reasoning_parser": None, "tool_call_parser": None, "max_model_len": None}


def vllm(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args = cli.build_parser().parse_args(cli.dash_spelling(["vllm-serve", *argv]))
    args.argv = cli.dash_spelling(argv)
    return cli.api_server_args("vllm", "vllm-serve", args, args.parser)


def sglang(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = cli.launch_server_parser()
    args = parser.parse_args(cli.dash_spelling(argv))
    args.argv = cli.dash_spelling(argv)
    return cli.api_server_args("sglang", "launch_server", args, parser)


def underscored(argv: list[str]) -> list[str]:
    """Every long flag written with underscores (`--tensor_parallel_size`), as the guide writes some."""
    return [a.split("=")[0].replace("-", "_").replace("__", "--", 1) + a[len(a.split("=")[0]):]
            if a.startswith("--") else a for a in argv]


def dashed(argv: list[str]) -> list[str]:
    return [a.split("=")[0].replace("_", "-") + a[len(a.split("=")[0]):] if a.startswith("--") else a for a in argv]


GUIDE = {
    "vllm tp+ep": (vllm, VLLM_TP, dict(tp=16, ep=16, dp=1, nnodes=1, node_rank=0, dist_init_addr=None,
                                       headless=False, distributed_executor_backend="ray", max_model_len=65536,
                                       reasoning_parser="deepseek_r1", tool_call_parser="hermes")),
    "vllm dp+ep node 0": (vllm, VLLM_DP_NODE0, dict(
        tp=1, ep=16, dp=16, nnodes=2, node_rank=0, dist_init_addr=f"{NODE0}:13345", headless=False,
        distributed_executor_backend="mp", cache_max_entry_count=0.8, mm_processor_cache_gb=0.0,
        media_io_kwargs=MEDIA, max_model_len=65536, api_server_count=8, reasoning_parser="deepseek_r1",
        tool_call_parser="hermes")),
    "vllm dp+ep node 1": (vllm, VLLM_DP_NODE1, dict(
        tp=1, ep=16, dp=16, nnodes=2, node_rank=1, dist_init_addr=f"{NODE0}:13345", headless=False,
        api_server_count=None, media_io_kwargs=MEDIA, max_model_len=65536)),
    "sglang node 0": (sglang, SGLANG.format(rank=0), dict(
        tp=16, ep=16, dp=1, nnodes=2, node_rank=0, dist_init_addr=f"{NODE0}:5000", headless=False,
        cache_max_entry_count=0.85, reasoning_parser="qwen3", tool_call_parser="qwen", server_port=30000,
        server_name="127.0.0.1")),
    "sglang node 1": (sglang, SGLANG.format(rank=1), dict(
        tp=16, ep=16, dp=1, nnodes=2, node_rank=1, dist_init_addr=f"{NODE0}:5000", headless=True)),
}


@pytest.mark.parametrize("spelling", [dashed, underscored])
@pytest.mark.parametrize("name", list(GUIDE))
def test_the_guides_command_lines_map_onto_the_api_server_flags(name, spelling):
    parse, line, want = GUIDE[name]
    argv = spelling(shlex.split(line))
    assert spelling is dashed or any("_" in a for a in argv if a.startswith("--"))
    args, notes = parse(argv)
    got = {key: getattr(args, key) for key in want}
    assert got == want
    assert args.model == MODEL
    given = {a.split("=")[0] for a in dashed(argv) if a.startswith("--")}
    logged = {note.split(": ", 1)[1].split(" ")[0].split(":")[0] for note in notes}
    assert given - logged == set(), "every flag given is logged with what it became"
    assert notes[-1].split(": runs as ")[1].startswith("s1serve serve api_server " + MODEL)


def test_the_ignored_flags_say_why():
    _, notes = sglang(shlex.split(SGLANG.format(rank=0)))
    (fa3,) = [n for n in notes if "--attention-backend fa3" in n]
    assert "ignored" in fa3 and "PyTorch" in fa3
    _, notes = vllm(shlex.split(VLLM_DP_NODE0))
    (a2a,) = [n for n in notes if "--all2all-backend" in n]
    assert "ignored" in a2a


def test_sglang_dp_attention_and_kv_tokens():
    args, _ = sglang(["--model-path", MODEL, "--tp", "2", "--dp", "2", "--ep", "2", "--enable-dp-attention",
                      "--max-total-tokens", "1000", "--page-size", "16", "--disable-radix-cache"])
    assert (args.tp, args.dp, args.ep, args.num_kv_blocks, args.block_size) == (1, 2, 2, 63, 16)
    assert args.enable_prefix_caching is False


def test_vllm_ngram_speculative_config_maps_onto_the_engine_flags():
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    args, _ = vllm([MODEL, "--speculative-config", spec])
    assert (args.speculative_ngram_tokens, args.prompt_lookup_max, args.prompt_lookup_min) == (4, 3, 3)
    args, _ = vllm([MODEL])
    assert args.speculative_ngram_tokens == 0


@pytest.mark.parametrize("parse, argv, named", [
    (vllm, [MODEL, "--pipeline-parallel-size", "2"], "--pipeline-parallel-size 2"),
    (vllm, [MODEL, "--served-model-name", "a", "b"], "--served-model-name a b"),
    (vllm, [MODEL, "-dp", "4", "--data-parallel-size-local", "3"], "--data-parallel-size-local 3"),
    (vllm, [MODEL, "--data-parallel-address", NODE0], "--data-parallel-address"),
    (vllm, [MODEL, "--dtype", "float16"], "--dtype"),
    (vllm, [MODEL, "--unknown-flag", "1"], "--unknown-flag"),
    (sglang, ["--model-path", MODEL, "--tp", "2", "--dp", "4", "--enable-dp-attention"], "--enable-dp-attention"),
    (sglang, ["--model-path", MODEL, "--speculative-algorithm", "EAGLE"], "--speculative-algorithm"),
    (vllm, [MODEL, "--speculative-config", '{"method": "eagle", "num_speculative_tokens": 3}'], "--speculative-config"),
    (vllm, [MODEL, "--speculative-config", '{"method": "ngram"}'], "--speculative-config"),
])
def test_a_flag_that_cannot_be_honoured_is_refused_by_name(parse, argv, named, capsys):
    with pytest.raises(SystemExit) as exit:
        parse(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and named in err.splitlines()[-1]
    prog = "s1serve vllm-serve" if parse is vllm else "python -m s1serve.launch_server"
    assert err.startswith(f"usage: {prog} ")


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser the s1serve commands use, by the command line that reaches it."""
    found = {"s1serve": cli.build_parser(), "python -m s1serve.launch_server": cli.launch_server_parser()}
    todo = [("s1serve", found["s1serve"])]
    while todo:
        name, parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    found[f"{name} {sub}"] = subparser
                    todo.append((f"{name} {sub}", subparser))
    return found


def test_every_parser_refuses_abbreviations_and_shows_defaults():
    assert {"s1serve serve api_server", "s1serve vllm-serve", "s1serve serve proxy", "s1serve generate"} <= set(parsers())
    for name, parser in parsers().items():
        assert parser.allow_abbrev is False, name
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.default is not argparse.SUPPRESS:
                text = formatter._format_action(action)
                assert "default" in text, f"{name} {action.option_strings[0]}: {text!r}"


@pytest.mark.parametrize("argv, usage", [
    (["serve", "api_server", MODEL, "--max-model", "1024"], "usage: s1serve serve api_server "),
    (["serve", "api_server", MODEL, "--no-such-flag"], "usage: s1serve serve api_server "),
    (["vllm-serve", MODEL, "--max-model", "1024"], "usage: s1serve vllm-serve "),
    (["serve", "proxy", "--server-p", "1"], "usage: s1serve serve proxy "),
    (["generate", MODEL, "--prompt", "x", "--max-tok", "3"], "usage: s1serve generate "),
])
def test_an_abbreviation_is_an_unknown_flag_and_the_failing_commands_usage_is_printed(argv, usage, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(usage), err
    assert "unrecognized arguments" in err


def test_an_abbreviation_is_refused_by_launch_server(capsys):
    with pytest.raises(SystemExit):
        cli.main_launch_server(["--model-path", MODEL, "--context-len", "1024"])
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m s1serve.launch_server ") and "--context-len" in err


def test_underscores_are_read_as_dashes():
    assert cli.dash_spelling(["--mm_processor_cache_gb=0", "x_y", "--a_b", "--", "--c_d"]) == [
        "--mm-processor-cache-gb=0", "x_y", "--a-b", "--", "--c_d"]


def run(*argv: str, module: str = "s1serve", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("argv, module", [
    (["serve", "api_server", "/no/such/model", "--dp", "2"], "s1serve"),
    (["serve", "api_server", "/no/such/model", "--dp", "16", "--ep", "16"], "s1serve"),
    (["vllm-serve", "/no/such/model", "-dp", "2", "--enable-expert-parallel"], "s1serve"),
    (["--model-path", "/no/such/model", "--tp", "2"], "s1serve.launch_server"),
])
def test_a_wrong_model_path_fails_before_any_rank_starts(argv, module):
    started = time.monotonic()
    done = run(*argv, module=module)
    elapsed = time.monotonic() - started
    print(f"\n{' '.join(argv)}: exit {done.returncode} after {elapsed:.2f} s")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: /no/such/model: not a folder"], done.stderr
    assert "DP rank" not in done.stderr and "rank-" not in done.stderr  # nothing was launched


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A folder with the tiny checkpoint's config.json only: enough for every check before launch."""
    from s1serve.checkpoint.tiny import tiny_config

    folder = tmp_path_factory.mktemp("config_only")
    (folder / "config.json").write_text(json.dumps(tiny_config("tiny", "interns1_pro")))
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--dp", "3", "--ep", "2"], "--ep must be 1 or 3"),
    (["--max-model-len", "10000000"], "exceeds the model's max positions"),
    (["--reasoning-parser", "nope"], "unknown reasoning parser 'nope'"),
    (["--api-server-count", "0"], "--api-server-count must be at least 1 (got 0)"),
    (["--media-io-kwargs", '{"video": {"frames": 3}}'], "--media-io-kwargs: video takes"),
    (["--limit-mm-per-prompt", '{"image": -1}'], "--limit-mm-per-prompt: expected"),
    (["--server-port", "70000"], "--server-port 70000 is not a port"),
    (["--dp", "2", "--server-port", "65535"], "--server-port + DP rank 65536 is not a port"),
])
def test_checks_before_launch(config_only, flags, message, capsys):
    assert cli.main(["serve", "api_server", str(config_only), *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_a_busy_port_is_found_before_launch(config_only, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["serve", "api_server", str(config_only), "--server-name", "127.0.0.1",
                         "--server-port", str(port)])
    assert code == 2 and f"--server-port {port} on 127.0.0.1 cannot be used" in capsys.readouterr().err


def test_lmdeploy_master_address_variables_are_read(monkeypatch):
    from s1serve.parallel.config import ParallelConfig

    for name in ("S1SERVE_DP_MASTER_ADDR", "S1SERVE_DP_MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LMDEPLOY_DP_MASTER_ADDR", NODE0)
    monkeypatch.setenv("LMDEPLOY_DP_MASTER_PORT", "29555")
    assert ParallelConfig(dp=16, ep=16, nnodes=2).address == f"{NODE0}:29555"


def test_vllm_api_key_and_cors_flags_map_and_the_key_is_never_logged():
    args, notes = vllm([MODEL, "--api-key", "sk-secret-1", "--allowed-origins", '["https://a.example"]',
                        "--allow-credentials"])
    assert args.api_keys == ["sk-secret-1"]
    assert (args.allowed_origins, args.allow_credentials) == (["https://a.example"], True)
    assert all("sk-secret-1" not in note for note in notes)
    assert any("--api-key *** -> --api-keys ***" in note for note in notes)
    default, _ = vllm([MODEL])
    assert (default.api_keys, default.allowed_origins) == ([], None)  # no key, no CORS unless given
