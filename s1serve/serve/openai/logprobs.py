"""Logprobs in the API's shapes: chat's `logprobs.content`, the completions API's parallel lists (echoed prompt
first when asked for), and vLLM's `prompt_logprobs`. `token_text` gives a token's text (ServingContext.token_text:
ids past the tokenizer, the lm_head's padding rows, are "")."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from s1serve.layers.sampler import TokenLogprob

TokenText = Callable[[int], str]


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    }


def completion_logprobs(
    token_ids: list[int], entries: Sequence[TokenLogprob | None], k: int, token_text: TokenText
) -> dict:
    """One entry per token id; None (an echoed prompt's first token, which nothing predicts) gives null logprob and
    null top_logprobs, as vLLM's echo does. Each top_logprobs holds the k most likely."""
    tokens = [token_text(t) for t in token_ids]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {token_text(t): lp for t, lp in e.top[:k]} for e in entries],
        "text_offset": offsets,
    }


def prompt_logprobs_field(
    k: int | None, entries: list[TokenLogprob | None] | None, token_text: TokenText
) -> dict[str, list[dict | None]]:
    """{"prompt_logprobs": ...} in vLLM's shape when the request asks for them (k), else {}: per prompt token, None
    for the first, then {token id: {logprob, rank, decoded_token}} holding the prompt token and the k most likely
    (ranked 1..k)."""
    if k is None or entries is None:
        return {}
    return {"prompt_logprobs": [None if e is None else _position(e, k, token_text) for e in entries]}


def _position(entry: TokenLogprob, k: int, token_text: TokenText) -> dict:
    out = {str(entry.token_id): _logprob(entry.token_id, entry.logprob, entry.rank, token_text)}
    for rank, (token_id, logprob) in enumerate(entry.top[:k], 1):
        out.setdefault(str(token_id), _logprob(token_id, logprob, rank, token_text))
    return out


def _logprob(token_id: int, logprob: float, rank: int, token_text: TokenText) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": token_text(token_id)}
