"""The synchronous engine core: add requests, step, abort.

One step = schedule -> one forward over the flat batch -> sample the sequences whose known tokens are all
computed (or verify their draft tokens, speculation.py) -> append, check stops, fork n > 1 requests -> deltas.
Nothing here depends on time or threads: the same requests added in the same order give the same ids, and a
request's ids do not depend on what else is running (bf16 kernels on CPU are row-invariant; each request samples
from its own generator; under speculation a seeded sample's ids may, its distribution not: speculation.py).

The forward runs in a Runner: the model in this process, or (s1serve.distributed) a TP/EP group of ranks driven
from here, or one DP rank stepping in lock-step with the others. A step with nothing to run calls runner.idle(),
so that a DP rank whose MoE layers exchange tokens still joins the others' forward.

An exception while handling one request (its vision encoding, grammar mask or step, sampler row, detokenizer, stop
strings) ends that request's samples with finish_reason "error" and a message naming the stage, frees their blocks,
and the step goes on with the others (isolation.py). An exception in the forward (runner.execute) propagates: the
engine is dead.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch

from s1serve.config import GenerationDefaults
from s1serve.engine.admission import Admission
from s1serve.engine.block_manager import BlockManager
from s1serve.engine.config import EngineConfig, flag
from s1serve.engine.faults import FaultPlan
from s1serve.engine.grammar import Grammars, Matcher, apply_bitmask, bitmask_width
from s1serve.engine.isolation import StageError, fault_message, per_row
from s1serve.engine.media import FeatureCache, MediaInput
from s1serve.engine.model_runner import Runner, StepSequence
from s1serve.engine.outputs import OutputDelta
from s1serve.engine.prompt_logprobs import PromptLogprobs
from s1serve.engine.request import Request, Sequence, SequenceStatus
from s1serve.engine.scheduler import Scheduler
from s1serve.engine.speculation import Speculation
from s1serve.engine.text_output import TextOutput, TokenizerDetokenizer
from s1serve.layers.sampler import Sampler, SamplerOutput, TokenLogprob
from s1serve.sampling_params import (
    InvalidParameterError,
    SamplingParams,
    check_context_length,
    check_token_ids,
)

log = logging.getLogger("s1serve.engine")


class Engine:
    def __init__(
        self,
        runner: Runner,
        config: EngineConfig,
        defaults: GenerationDefaults,
        tokenizer: Any | None = None,
    ):
        """`runner`: the model in this process (a ModelRunner), or the ranks of a parallel group driven from here
        (s1serve.entrypoints builds it)."""
        text = runner.model.config.text
        num_blocks = runner.num_blocks
        if config.max_model_len is not None and config.max_model_len > text.max_position_embeddings:
            raise ValueError(
                f"{flag('max_model_len')} ({config.max_model_len}) exceeds the model's max positions "
                f"({text.max_position_embeddings})"
            )
        self.config = config
        self.defaults = defaults
        self.tokenizer = tokenizer
        self.vocab_size = text.vocab_size
        self.max_model_len = min(config.max_model_len or text.max_position_embeddings, num_blocks * config.block_size)
        fallback_eos = [] if text.eos_token_id is None else [text.eos_token_id]
        self.eos_ids = frozenset(defaults.eos_token_ids or fallback_eos)
        self.runner = runner
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.speculation = Speculation(config) if config.speculative_ngram_tokens else None
        self.scheduler = Scheduler(config, self.blocks, self.speculation.propose if self.speculation else None)
        self.faults = FaultPlan.from_env()  # test-only (faults.py); None unless S1SERVE_TEST_FAULT is set
        self.sampler = Sampler() if self.faults is None else self.faults.sampler(Sampler())
        self.requests: dict[str, Request] = {}
        self._seeds = random.Random(config.seed)
        model_config = runner.model.config
        self.media_pad_ids = frozenset(
            i for i in (model_config.image_token_id, model_config.video_token_id) if i is not None
        )
        self.feature_cache = FeatureCache(int(config.mm_processor_cache_gb * (1 << 30)))
        self.admission = Admission.for_engine(config, num_blocks, self.max_model_len)

    def shutdown(self) -> None:
        """Stops the runner's other ranks, if it has any (the engine cannot step afterwards)."""
        self.runner.shutdown()

    # ------------------------------------------------------------------------------------------------ requests

    def check_request(
        self, prompt_token_ids: list[int], params: SamplingParams, media: Sequence[MediaInput] = ()
    ) -> SamplingParams:
        """Validates a request (also outside the engine thread); returns its params with defaults filled in."""
        if media:
            self.check_media(prompt_token_ids, media)
        if not prompt_token_ids:
            raise InvalidParameterError("prompt", "prompt is empty: give at least one token")
        check_token_ids(prompt_token_ids, self.vocab_size)
        check_context_length(len(prompt_token_ids), self.max_model_len)
        if params.n > self.config.max_num_seqs:
            raise InvalidParameterError(
                "n", f"n ({params.n}) exceeds {flag('max_num_seqs')} ({self.config.max_num_seqs})"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError("stop", "stop strings need a tokenizer; this engine has none")
        if params.constraint is not None:
            if self.tokenizer is None:
                raise InvalidParameterError("constraint", "constrained decoding needs a tokenizer; this engine has none")
            self.grammars.validate(params.constraint)
        return params.with_defaults(self.defaults)

    def admit(self, num_prompt_tokens: int) -> None:
        """QueueFullError if a served request of that many prompt tokens is over the admission limits now
        (engine/admission.py); the engine loops that serve clients call it before add_request."""
        self.admission.check(len(self.requests), self.scheduler.waiting, num_prompt_tokens)

    def check_media(self, prompt_token_ids: list[int], media: Sequence[MediaInput]) -> None:
        model = self.runner.model
        if not model.has_vision:
            raise InvalidParameterError(
                "media", "this checkpoint has no vision tower (no vision_config or no model.visual.* weights): "
                "it takes text only, so images and videos cannot be given to it"
            )
        merge = model.config.vision.spatial_merge_size
        for i, item in enumerate(media):
            problem = item.check(prompt_token_ids, self.media_pad_ids, merge)
            if problem is None and i and item.start < media[i - 1].end:
                problem = "it overlaps the item before it"
            if problem is not None:
                raise InvalidParameterError("media", f"media item {i + 1}: {problem}")
        pads = sum(1 for t in prompt_token_ids if t in self.media_pad_ids)
        if pads != sum(item.num_pads for item in media):
            raise InvalidParameterError(
                "media", f"the prompt holds {pads} image/video pad tokens, its media items "
                f"{sum(item.num_pads for item in media)}: each pad needs a feature"
            )

    @cached_property
    def grammars(self) -> Grammars:
        """Built on the first constrained request: turning the token table into the grammar engine's takes ~0.5 s."""
        from s1serve.engine.structured_output import GrammarCompiler  # the grammar library loads only when used

        eos = next(iter(sorted(self.eos_ids)), None)
        grammars = GrammarCompiler.from_tokenizer(self.tokenizer, self.runner.model.config.text.vocab_size, eos)
        return grammars if self.faults is None else self.faults.grammars(grammars)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, media: Sequence[MediaInput] = ()
    ) -> None:
        """`media`: the prompt's images and videos (processed), in prompt order; their features replace its pads."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = list(prompt_token_ids)
        params = self.check_request(prompt, params, media)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            seed=self._seeds.getrandbits(63) if params.seed is None else params.seed,
            max_len=self.max_model_len,
            stop_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids),
            media=tuple(media),
            prompt_logprobs=None if params.prompt_logprobs is None else PromptLogprobs(prompt, params.prompt_logprobs),
        )
        seq = self._new_sequence(request, 0, prompt)
        seq.pending_forks = params.n - 1
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = TokenizerDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
            )
        text = TextOutput(detokenizer, params.stop)
        grammar = None if params.constraint is None else self.grammars.matcher(params.constraint)
        if self.faults is not None:
            text = self.faults.text_output(request.prompt_token_ids, detokenizer, params.stop)
            grammar = grammar and self.faults.matcher(request.prompt_token_ids, grammar)
        seq = Sequence(
            request=request,
            index=index,
            token_ids=list(token_ids),
            generator=torch.Generator().manual_seed(request.sample_seed(index)),
            text=text,
            grammar=grammar,
        )
        request.sequences.append(seq)
        return seq

    def abort(self, request_id: str) -> list[OutputDelta]:
        """Stops a request and frees its blocks; returns the closing delta of each unfinished sample."""
        request = self.requests.get(request_id)
        if request is None:
            return []
        deltas = []
        for seq in request.sequences:
            if not seq.finished:
                deltas += self._close(seq, "abort")
        return deltas

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -------------------------------------------------------------------------------------------------- a step

    def step(self) -> list[OutputDelta]:
        out = self.scheduler.schedule()
        deltas = []
        for seq in out.infeasible:
            deltas += self._close(seq, "length")
        scheduled, step = self._step_sequences(out.scheduled, deltas)
        if not scheduled:
            self.runner.idle()
            return deltas

        # Sampled (or verifying drafts): the sequences whose known tokens are all computed after this step.
        ready = [i for i, (s, n) in enumerate(scheduled) if s.num_computed_tokens + n == s.num_tokens + len(s.draft_ids)]
        output = self.runner.execute(step, ready)  # not isolated: a failing forward is the engine's death
        for (seq, n), scores in zip(scheduled, output.prompt_logprobs):
            if seq.request.prompt_logprobs is not None:
                seq.request.prompt_logprobs.add(scores)
            seq.num_computed_tokens += n - len(seq.draft_ids)  # drafts count once accepted
            self.blocks.cache_full_blocks(seq)

        samples: list[Sequence] = []
        rows: list[int] = []
        verifying: list[tuple[Sequence, int]] = []  # (sequence with drafts, its first logits row)
        offset = 0
        for i in ready:
            seq = scheduled[i][0]
            if seq.draft_ids:
                verifying.append((seq, offset))
            else:
                family = [seq] + self._fork(seq)
                samples += family
                rows += [offset] * len(family)
            offset += 1 + len(seq.draft_ids)
        for seq, _ in scheduled:
            self._release_features(seq.request)
        if verifying:
            deltas += self._verify(output.logits, verifying)
        if not samples:
            return deltas
        logits = output.logits if rows == list(range(offset)) else output.logits[rows]
        constrained = [(row, seq.grammar) for row, seq in enumerate(samples) if seq.grammar is not None]
        if constrained:
            logits = logits.clone()  # the runner's logits are inference tensors: no in-place updates
            self._apply_grammars(logits, samples, constrained, deltas)
        result = self._sample(logits, samples, deltas)
        for seq, token, logprob in zip(samples, result.token_ids, result.logprobs):
            if seq.finished:  # its request failed in this step
                continue
            try:
                deltas.append(self._append(seq, token, logprob))
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                deltas += self._fail(seq.request, exc.stage if isinstance(exc, StageError) else "output", exc)
        return deltas

    def _verify(self, logits: torch.Tensor, verifying: list[tuple[Sequence, int]]) -> list[OutputDelta]:
        """Verifies the drafts of the sequences in one call (if it raises, one by one, and the requests whose rows
        fail fail); appends each one's accepted drafts and the model's token, stopping at a stop."""
        assert self.speculation is not None
        seqs = [seq for seq, _ in verifying]
        spans = [list(range(start, start + 1 + len(seq.draft_ids))) for seq, start in verifying]
        deltas: list[OutputDelta] = []
        try:
            verified = dict(enumerate(self.speculation.verify(logits[[r for s in spans for r in s]], seqs)))
        except Exception:  # noqa: BLE001 - find the sequences that fail
            verified, errors = per_row(len(seqs), lambda i: self.speculation.verify(logits[spans[i]], [seqs[i]])[0])
            for i, exc in errors.items():
                if not seqs[i].finished:
                    deltas += self._fail(seqs[i].request, "sampler", exc)
        for i, seq in enumerate(seqs):
            seq.draft_ids = []
            if i not in verified or seq.finished:
                continue
            try:
                deltas.append(self._append_run(seq, verified[i]))
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                deltas += self._fail(seq.request, exc.stage if isinstance(exc, StageError) else "output", exc)
        return deltas

    def _append_run(self, seq: Sequence, tokens: list[int]) -> OutputDelta:
        """Appends verified tokens (accepted drafts, then the model's) one by one until a stop. The accepted drafts
        were computed in this step (their KV is the right one), so they count as computed and their full blocks go
        into the prefix cache; the KV at rejected positions lies past num_computed_tokens and is overwritten."""
        appended = []
        for i, token in enumerate(tokens):
            self._add_token(seq, token, None)
            appended.append(token)
            if seq.finished:
                break
            if i < len(tokens) - 1:
                seq.num_computed_tokens += 1
        if not seq.finished:
            self.blocks.cache_full_blocks(seq)
        return self._delta(seq, appended, None)

    def _step_sequences(
        self, scheduled: list[tuple[Sequence, int]], deltas: list[OutputDelta]
    ) -> tuple[list[tuple[Sequence, int]], list[StepSequence]]:
        """The scheduled sequences whose inputs could be built, and their inputs. A request whose media fails to
        encode fails (its error deltas go to `deltas`) and leaves the step."""
        kept, step = [], []
        for seq, n in scheduled:
            if seq.finished:  # a sibling's request failed earlier in this loop
                continue
            try:
                step.append(self._step_sequence(seq, n))
            except Exception as exc:  # noqa: BLE001 - the vision tower on this request's picture
                deltas += self._fail(seq.request, "vision", exc)
                continue
            kept.append((seq, n))
        return kept, step

    def _apply_grammars(
        self,
        logits: torch.Tensor,
        samples: list[Sequence],
        constrained: list[tuple[int, Matcher]],
        deltas: list[OutputDelta],
    ) -> None:
        """In place: -inf on the logits each constrained row's grammar forbids. The masks are filled in one call;
        if it raises, row by row, and the requests whose rows fail fail."""
        bitmask = torch.empty(len(constrained), bitmask_width(self.vocab_size), dtype=torch.int32)
        try:
            self.grammars.fill_bitmasks([(grammar, k) for k, (_, grammar) in enumerate(constrained)], bitmask)
        except Exception:  # noqa: BLE001 - find the rows that fail
            _, errors = per_row(len(constrained), lambda k: self.grammars.fill_bitmasks([(constrained[k][1], k)], bitmask))
            for k, exc in errors.items():
                bitmask[k].fill_(-1)  # all allowed: the row's token is sampled as usual, then dropped
                deltas += self._fail(samples[constrained[k][0]].request, "grammar", exc)
        rows_masked = torch.tensor([row for row, _ in constrained], device=logits.device)
        masked = logits.index_select(0, rows_masked)
        apply_bitmask(masked, bitmask, self.vocab_size)
        logits.index_copy_(0, rows_masked, masked)

    def _sample(self, logits: torch.Tensor, samples: list[Sequence], deltas: list[OutputDelta]) -> SamplerOutput:
        """One token per row, in one call; if it raises, row by row, and the requests whose rows fail fail (their
        rows get token 0, never appended)."""

        def run(rows: list[int]) -> SamplerOutput:
            chosen = [samples[i] for i in rows]
            return self.sampler(
                logits if len(rows) == len(samples) else logits[rows],
                [s.request.params for s in chosen],
                [s.generator for s in chosen],
                [s.request.prompt_token_ids for s in chosen],
                [s.output_token_ids for s in chosen],
            )

        try:
            return run(list(range(len(samples))))
        except Exception:  # noqa: BLE001 - find the rows that fail
            results, errors = per_row(len(samples), lambda i: run([i]))
        for i, exc in errors.items():
            if not samples[i].finished:
                deltas += self._fail(samples[i].request, "sampler", exc)
        return SamplerOutput(
            [results[i].token_ids[0] if i in results else 0 for i in range(len(samples))],
            [results[i].logprobs[0] if i in results else None for i in range(len(samples))],
        )

    def _step_sequence(self, seq: Sequence, n: int) -> StepSequence:
        """The sequence's part of a step; with the vision features of the media pads among its n new tokens."""
        start = seq.num_computed_tokens
        if seq.draft_ids:  # decoding: its last token and the drafts to verify
            tokens = seq.next_tokens(n - len(seq.draft_ids)) + seq.draft_ids
            return StepSequence(tokens, start, seq.block_table, logits_rows=1 + len(seq.draft_ids))
        prompt_logprobs = seq.request.prompt_logprobs
        scoring = None if prompt_logprobs is None else prompt_logprobs.rows(start, n)
        rows, embeds = [], []
        for i, item in enumerate(seq.request.media):
            if item.start >= start + n or item.end <= start:
                continue
            positions = item.pad_positions()
            inside = (positions >= start) & (positions < start + n)
            rows += (positions[inside] - start).tolist()
            embeds.append(self._features(seq.request, i)[inside])
        if not rows:
            return StepSequence(seq.next_tokens(n), start, seq.block_table, prompt_scoring=scoring)
        return StepSequence(seq.next_tokens(n), start, seq.block_table, tuple(rows), torch.cat(embeds), scoring)

    def _features(self, request: Request, index: int) -> torch.Tensor:
        """Vision features of the request's media item `index`: kept, cached, or encoded now (once per item)."""
        features = request.media_features.get(index)
        if features is None:
            item = request.media[index]
            features = self.feature_cache.get(item.key)
            if features is None:
                if self.faults is not None:
                    self.faults.check("vision", request.prompt_token_ids)
                with torch.inference_mode():
                    features = self.runner.model.encode_images(item.pixel_values, torch.tensor([item.grid_thw]))
                self.feature_cache.put(item.key, features)
            request.media_features[index] = features
        return features

    def _release_features(self, request: Request) -> None:
        """Drops the features of items whose pads every sample has computed (a fork recomputes from its last full
        block, so none is dropped while samples are still to fork)."""
        if not request.media_features or any(s.pending_forks for s in request.sequences):
            return
        computed = min((s.num_computed_tokens for s in request.sequences if not s.finished), default=None)
        for i in list(request.media_features):
            if computed is None or request.media[i].end <= computed:
                del request.media_features[i]

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The other n - 1 samples of a request whose prompt was just computed; they share its full blocks."""
        children = []
        for _ in range(parent.pending_forks):
            child = self._new_sequence(parent.request, len(parent.request.sequences), parent.token_ids)
            self.blocks.share_prefix(parent, child)
            self.scheduler.add_running(child)
            children.append(child)
        parent.pending_forks = 0
        return children

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> OutputDelta:
        self._add_token(seq, token, logprob)
        return self._delta(seq, [token], logprob)

    def _add_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Appends one token and ends the sample if it stops it."""
        request, params = seq.request, seq.request.params
        seq.token_ids.append(token)
        if seq.grammar is not None:
            try:
                seq.grammar.accept(token)
            except Exception as exc:
                raise StageError("grammar", exc) from exc
        if logprob is not None:
            seq.logprobs.append(logprob)
        if token in request.stop_ids:
            self._finish(seq, "stop", token if token in params.stop_token_ids else None)
        elif seq.grammar is not None and seq.grammar.is_finished():
            # The constrained output is complete (its end token accepted): nothing may follow, even with ignore_eos.
            self._finish(seq, "stop")
        elif (stop := seq.text.append(token)) is not None:
            self._finish(seq, "stop", stop)
        elif (params.max_tokens is not None and seq.num_tokens - seq.num_prompt_tokens >= params.max_tokens) or (
            seq.num_tokens >= request.max_len
        ):
            self._finish(seq, "length")

    def _fail(self, request: Request, stage: str, exc: BaseException) -> list[OutputDelta]:
        """Ends every unfinished sample of `request` with finish_reason "error" (their blocks freed); their
        closing deltas carry the message naming the stage."""
        message = fault_message(stage, exc)
        log.error("request %s failed: %s", request.request_id, message, exc_info=exc)
        deltas = []
        for seq in request.sequences:
            if not seq.finished:
                self._end(seq, "error")
                deltas.append(
                    OutputDelta(request.request_id, seq.index, [], "", [] if request.params.logprobs is not None else None,
                                "error", num_cached_tokens=seq.num_prefix_hit_tokens, error=message)
                )
        return deltas

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.text.finish()  # first: if it raises, the sample is still open for _fail to end
        self._end(seq, reason, stop_reason)

    def _close(self, seq: Sequence, reason: str) -> list[OutputDelta]:
        """Ends a sample outside of sampling (an abort, a sequence the cache cannot hold) with its closing delta."""
        try:
            self._finish(seq, reason)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            return self._fail(seq.request, exc.stage if isinstance(exc, StageError) else "output", exc)
        return [self._delta(seq, [], None)]

    def _end(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Takes the sample out of the scheduler (its blocks freed) and the request out once all its samples ended."""
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.remove(seq)
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.request.finished:
            del self.requests[seq.request.request_id]

    def _delta(self, seq: Sequence, token_ids: list[int], logprob: TokenLogprob | None) -> OutputDelta:
        wants_logprobs = seq.request.params.logprobs is not None
        prompt_logprobs = seq.request.prompt_logprobs
        return OutputDelta(
            request_id=seq.request.request_id,
            index=seq.index,
            token_ids=token_ids,
            text=seq.text.delta(seq.finished),
            logprobs=([logprob] if logprob is not None else []) if wants_logprobs else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_cached_tokens=seq.num_prefix_hit_tokens,
            prompt_logprobs=None if prompt_logprobs is None else prompt_logprobs.take(),
        )

    # ---------------------------------------------------------------------------------------------- statistics

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def num_prefix_hit_tokens(self) -> int:
        return self.blocks.prefix_hits

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_query_tokens=self.blocks.prefix_queries,
            prefix_hit_tokens=self.blocks.prefix_hits,
            mm_cache_queries=self.feature_cache.queries,
            mm_cache_hits=self.feature_cache.hits,
            spec_draft_tokens=self.speculation.num_draft_tokens if self.speculation else 0,
            spec_accepted_tokens=self.speculation.num_accepted_tokens if self.speculation else 0,
        )


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # sequences
    num_waiting: int
    num_blocks: int
    num_free_blocks: int  # free or evictable
    num_preemptions: int  # since start
    prefix_query_tokens: int  # prompt tokens looked up in the prefix cache, since start
    prefix_hit_tokens: int  # of which found
    mm_cache_queries: int = 0  # media items looked up in the vision-feature cache, since start
    mm_cache_hits: int = 0  # of which found (not encoded again)
    spec_draft_tokens: int = 0  # draft tokens verified (n-gram speculation), since start
    spec_accepted_tokens: int = 0  # of which accepted
