"""The event loop only does I/O: a chat request's rendering, tokenising and grammar are made in worker threads
(a long prompt would otherwise hold up every other request and /health while it is prepared). Shown on
ChatServing.prepare, the preparation that chat, Responses and Messages requests share, with the real tokenizer."""

from __future__ import annotations

import asyncio
import threading

from s1serve.serve.openai import serving as serving_module
from s1serve.serve.openai.metrics import ServerMetrics
from s1serve.serve.openai.prepare import ServingContext
from s1serve.serve.openai.protocol import ChatCompletionRequest
from s1serve.serve.openai.serving import ChatServing
from s1serve.tokenizer import load_tokenizer


class _Recorder:
    """The real tokenizer, noting the thread of each encode / render call."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.threads: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self._tokenizer, name)
        if name not in ("encode", "apply_chat_template"):
            return attr

        def call(*args, **kwargs):
            self.threads.append(threading.current_thread().name)
            return attr(*args, **kwargs)

        return call


class _IdleEngine:
    """Preparing asks the engine only whether it is alive and has room (nothing is generated here)."""

    errored = False
    error = None

    def check_admission(self) -> None:
        pass


def test_chat_preparation_renders_tokenises_and_builds_the_grammar_off_the_event_loop(tiny_checkpoint, monkeypatch) -> None:
    tokenizer = _Recorder(load_tokenizer(tiny_checkpoint))
    ctx = ServingContext(engine=_IdleEngine(), tokenizer=tokenizer, model_name="m", max_model_len=65536,
                         vocab_size=155008, metrics=ServerMetrics("m"), reasoning_parser=None, tool_parser=None)
    grammar_threads = []
    real = serving_module.chat_constraint

    def chat_constraint(*args):
        grammar_threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(serving_module, "chat_constraint", chat_constraint)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "word " * 30000}], max_tokens=8,
                                response_format={"type": "json_object"})

    async def prepare() -> tuple[str, object]:
        return threading.current_thread().name, await ChatServing(ctx).prepare(req)

    loop_thread, prepared = asyncio.run(prepare())
    assert len(prepared.gen.prompt_ids) > 30000
    assert prepared.gen.params.constraint is not None
    assert tokenizer.threads and loop_thread not in tokenizer.threads, tokenizer.threads
    assert grammar_threads and loop_thread not in grammar_threads, grammar_threads
