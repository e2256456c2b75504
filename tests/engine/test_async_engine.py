"""AsyncEngine: streams deltas from the engine thread, aborts free everything, bad input fails alone."""

from __future__ import annotations

import asyncio

import pytest
from engine_testing import make_llm, random_prompts

from s1serve import SamplingParams
from s1serve.engine.async_engine import AsyncEngine
from s1serve.engine.client import EngineDeadError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return make_llm(tiny_checkpoint, num_kv_blocks=128)


@pytest.fixture
def engine(llm):
    async_engine = AsyncEngine(llm.engine)
    yield async_engine
    async_engine.shutdown()


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, request_id: str) -> list:
    return [delta async for delta in engine.generate(prompt, params, request_id)]


def test_concurrent_streams_equal_offline_generation(llm, engine):
    prompts = random_prompts(6, 1, 80, seed=21)
    offline = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    for deltas, want in zip(streams, offline):
        assert [t for d in deltas for t in d.token_ids] == want
        assert all(len(d.token_ids) == 1 for d in deltas)  # incremental: one new id per step
        assert [d.finish_reason for d in deltas] == [None] * (len(want) - 1) + ["length"]


def test_abort_and_closed_streams_free_every_block(llm, engine):
    prompts = random_prompts(8, 20, 120, seed=22)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        aborted = asyncio.create_task(collect(engine, prompts[0], long, "aborted"))
        cancelled = asyncio.create_task(collect(engine, prompts[1], long, "cancelled"))
        early_exit = []

        async def leave_early():
            async for delta in engine.generate(prompts[2], long, "left"):
                early_exit.append(delta)
                if len(early_exit) == 3:
                    break

        others = [asyncio.create_task(collect(engine, p, GREEDY, f"o{i}")) for i, p in enumerate(prompts[3:])]
        await leave_early()
        while (await engine.stats()).num_running < 2:
            await asyncio.sleep(0)
        engine.abort("aborted")
        cancelled.cancel()
        results = await asyncio.gather(*others)
        aborted_deltas = await aborted
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return results, aborted_deltas, await engine.stats()

    results, aborted_deltas, stats = asyncio.run(main())
    assert all(len([t for d in r for t in d.token_ids]) == GREEDY.max_tokens for r in results)
    assert aborted_deltas[-1].finish_reason == "abort"
    assert 0 < sum(len(d.token_ids) for d in aborted_deltas) < long.max_tokens
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_blocks == 128


def test_bad_requests_raise_value_errors_and_others_go_on(engine):
    prompt = random_prompts(1, 10, 10, seed=23)[0]

    async def main():
        good = asyncio.create_task(collect(engine, prompt, GREEDY, "good"))
        await asyncio.sleep(0)
        for bad_prompt, message in [([], "prompt is empty"), ([7] * 5000, "max_model_len"), ([-1], "vocabulary")]:
            with pytest.raises(ValueError, match=message):
                await collect(engine, bad_prompt, GREEDY, "bad")
        with pytest.raises(ValueError, match="already in use"):
            await collect(engine, prompt, GREEDY, "good")
        return await good

    deltas = asyncio.run(main())
    assert sum(len(d.token_ids) for d in deltas) == GREEDY.max_tokens and deltas[-1].finish_reason == "length"


def test_the_event_loop_runs_while_the_engine_steps(engine):
    prompt = random_prompts(1, 50, 50, seed=24)[0]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def main():
        ticks = 0
        ticks_between_deltas = []

        async def heartbeat():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        beat = asyncio.create_task(heartbeat())
        last = None
        async for _ in engine.generate(prompt, params, "r"):
            if last is not None:
                ticks_between_deltas.append(ticks - last)
            last = ticks
        beat.cancel()
        return ticks_between_deltas

    gaps = asyncio.run(main())
    # Steps run in the engine thread: while one computes, the loop goes round many times. Were the engine
    # stepping on the loop, the heartbeat could only tick once between two deltas.
    assert len(gaps) == 59 and max(gaps) > 3


def test_shutdown_aborts_open_requests_and_refuses_new_ones(llm):
    engine = AsyncEngine(llm.engine)
    prompt = random_prompts(1, 10, 10, seed=25)[0]
    long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

    async def main():
        stream = engine.generate(prompt, long, "open")
        deltas = [await stream.__anext__()]
        engine.shutdown()
        deltas += [d async for d in stream]
        with pytest.raises(EngineDeadError):
            await collect(engine, prompt, GREEDY, "late")
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "abort" and sum(len(d.token_ids) for d in deltas) < long.max_tokens
    assert engine.errored and not llm.engine.has_unfinished_requests() and llm.engine.num_free_blocks == 128
