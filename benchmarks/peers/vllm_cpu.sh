#!/usr/bin/env bash
# vLLM's CPU build as the serving benchmark's peer, in a venv of its own, on this machine's CPU torch.
#
#   benchmarks/peers/vllm_cpu.sh install                  # venv at $VLLM_VENV (default /tmp/vllm-venv)
#   benchmarks/peers/vllm_cpu.sh serve MODEL PORT [ARGS]  # OpenAI server on 127.0.0.1:PORT; ARGS go to vLLM
#   benchmarks/peers/vllm_cpu.sh version
#
# `serve` runs it as its CPU guide recommends, with compute on every core (issue 16 measured 0-1 against its default
# binding on the 2-core box: 1.3-1.9x the output tok/s at 1-32 concurrent):
#   VLLM_CPU_OMP_THREADS_BIND=0-(N-1)  compute threads on every core (its default, auto, keeps one core for the
#                                      API process and computes on the rest: one core here)
#   LD_PRELOAD tcmalloc + Intel OpenMP the allocator and OpenMP runtime its CPU guide asks for (the Debian package
#                                      libtcmalloc-minimal4; libiomp5 from the intel-openmp wheel it pulls in)
#   VLLM_CPU_KVCACHE_SPACE=4           GiB of KV cache, set explicitly as its CPU guide advises (room for 512k
#                                      tokens of the bench preset, 8 KiB each)
# Each can be overridden from the environment (VLLM_PRELOAD="" turns the preloads off).
# Workarounds: its `vllm` console script fails (importlib.metadata looks for a distribution named `vllm`, the
# wheel's is `vllm-cpu`), so the server runs as a module; pip pulls CUDA builds of torchvision/torchaudio/torchcodec
# that do not load with the CPU torch, so they are removed (a text-only model needs none of them); it cannot load the
# Intern-S1 tokenizer (remote code), so it gets a plain Qwen2 tokenizer folder built from the checkpoint's own
# vocab.json, merges.txt and special tokens (the same ids; the benchmark sends token ids anyway).
set -euo pipefail

VLLM_VENV=${VLLM_VENV:-/tmp/vllm-venv}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}
PY="$VLLM_VENV/bin/python"

install() {
    [ -x "$PY" ] || python3 -m venv "$VLLM_VENV"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 && command -v apt-get >/dev/null; then
        apt-get install -y -qq libtcmalloc-minimal4 >/dev/null || echo "tcmalloc not installed: serving without it" >&2
    fi
    version
}

version() {
    "$PY" -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"), "torch", m.version("torch"))'
}

# A plain Qwen2 tokenizer folder beside the venv with the checkpoint's vocabulary (no remote code).
tokenizer_dir() {
    local model=$1 out="$VLLM_VENV/tokenizers/$(basename "$1")"
    if [ ! -f "$out/tokenizer_config.json" ]; then
        mkdir -p "$out"
        cp "$model/vocab.json" "$model/merges.txt" "$model/config.json" "$out/"  # config.json: it reads model_type
        "$PY" - "$model" "$out" <<'PY'
import json, sys
model, out = sys.argv[1:]
config = json.load(open(f"{model}/tokenizer_config.json"))
keep = ("added_tokens_decoder", "additional_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token",
        "model_max_length", "clean_up_tokenization_spaces", "errors", "split_special_tokens")
plain = {k: config[k] for k in keep if k in config}
plain["tokenizer_class"] = "Qwen2Tokenizer"
json.dump(plain, open(f"{out}/tokenizer_config.json", "w"), indent=1)
PY
    fi
    echo "$out"
}

serve() {
    local model=$1 port=$2
    shift 2
    local tok last_core preload
    tok=$(tokenizer_dir "$model")
    last_core=$(($(nproc) - 1))
    preload=""
    for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 "$VLLM_VENV/lib/libiomp5.so"; do
        [ -f "$lib" ] && preload="${preload:+$preload:}$lib"
    done
    export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$last_core}
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
    export LD_PRELOAD=${VLLM_PRELOAD-$preload}
    echo "vllm_cpu.sh: VLLM_CPU_OMP_THREADS_BIND=$VLLM_CPU_OMP_THREADS_BIND VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE LD_PRELOAD=$LD_PRELOAD" >&2
    exec "$PY" -m vllm.entrypoints.openai.api_server --model "$model" --tokenizer "$tok" --dtype bfloat16 \
        --host 127.0.0.1 --port "$port" "$@"
}

case "${1:-}" in
    install) install ;;
    version) version ;;
    serve) shift; [ $# -ge 2 ] || { echo "usage: $0 serve MODEL PORT [ARGS]" >&2; exit 2; }; serve "$@" ;;
    *) echo "usage: $0 install | version | serve MODEL PORT [ARGS]" >&2; exit 2 ;;
esac
