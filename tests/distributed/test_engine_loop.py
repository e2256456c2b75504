"""The engine loop's contract with distributed runners, in one process with stand-in runners:
- a failure reported from outside a step (a worker died) fails open requests and calls at once, even while the
  engine thread is blocked in a forward that will never return;
- a runner that needs a heartbeat is ticked without requests, and on a tick where another rank has work a rank
  with none runs one idle step (so every rank enters the same forwards)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from s1serve import LLM, SamplingParams
from s1serve.engine.async_engine import AsyncEngine
from s1serve.engine.client import EngineDeadError
from s1serve.engine.engine import Engine
from s1serve.engine.model_runner import ModelRunner, StepSequence

LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), dtype="float32", skip_tokenizer_init=True, block_size=16, num_kv_blocks=64)


class StuckRunner(ModelRunner):
    """Its third step blocks until released, like a collective whose peer died; failures come from `report`."""

    def __init__(self, base: ModelRunner):
        super().__init__(base.model, base.num_blocks, base.block_size)
        self.steps = 0
        self.stuck = threading.Event()
        self.release = threading.Event()
        self.listeners: list[Callable[[BaseException], None]] = []

    def execute(self, seqs: list[StepSequence], logits_for: list[int]):
        self.steps += 1
        if self.steps == 3:
            self.stuck.set()
            self.release.wait(30)
            raise RuntimeError("the collective failed")
        return super().execute(seqs, logits_for)

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        self.listeners.append(callback)

    def report(self, error: BaseException) -> None:
        for callback in self.listeners:
            callback(error)


def test_a_failure_from_outside_fails_requests_while_the_step_is_stuck(llm):
    runner = StuckRunner(llm.engine.runner)
    engine = AsyncEngine(Engine(runner, llm.engine.config, llm.engine.defaults))
    deaths: list[BaseException] = []
    engine.on_death(deaths.append)

    async def main():
        stream = engine.generate([11, 12, 13], LONG, "r")
        first = await stream.__anext__()
        assert runner.stuck.wait(30)
        threading.Timer(0.05, runner.report, [RuntimeError("rank-1 (pid 7) was killed by SIGKILL")]).start()
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank-1 .* SIGKILL"):
            async for _ in stream:
                pass
        failed_after = time.monotonic() - started
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            await engine.stats()
        with pytest.raises(EngineDeadError):
            await anext(engine.generate([1], LONG, "late"))
        return first, failed_after

    first, failed_after = asyncio.run(main())
    assert first.token_ids and failed_after < 2
    deadline = time.monotonic() + 5
    while not deaths and time.monotonic() < deadline:  # the callbacks run in the reporting thread, after the wake-ups
        time.sleep(0.01)
    assert engine.errored and [str(e) for e in deaths] == ["rank-1 (pid 7) was killed by SIGKILL"]
    runner.release.set()
    engine.shutdown()


class TickingRunner(ModelRunner):
    """Stands in for a DP rank: `others` says on which ticks another rank has work."""

    needs_heartbeat = True

    def __init__(self, base: ModelRunner, others: list[bool]):
        super().__init__(base.model, base.num_blocks, base.block_size)
        self.others = others
        self.ticks = 0
        self.idle_steps = 0
        self.forwards = 0

    def any_work(self, local: bool) -> bool:
        other = self.others[self.ticks] if self.ticks < len(self.others) else False
        self.ticks += 1
        return local or other

    def idle(self) -> None:
        self.idle_steps += 1

    def execute(self, seqs: list[StepSequence], logits_for: list[int]):
        self.forwards += 1
        return super().execute(seqs, logits_for)


def test_an_idle_rank_ticks_and_joins_the_others_forwards_with_idle_steps(llm):
    runner = TickingRunner(llm.engine.runner, others=[False, True, True, False, True])
    engine = AsyncEngine(Engine(runner, llm.engine.config, llm.engine.defaults))
    deadline = time.monotonic() + 10
    while runner.ticks < 20 and time.monotonic() < deadline:  # no request: the loop still ticks
        time.sleep(0.01)
    assert runner.ticks >= 20 and runner.idle_steps == 3 and runner.forwards == 0

    async def main():
        return [d async for d in engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4), "r")]

    deltas = asyncio.run(main())
    engine.shutdown()
    assert sum(len(d.token_ids) for d in deltas) == 4 and runner.forwards == 4 and runner.idle_steps == 3
