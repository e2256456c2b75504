"""Fixed-size KV blocks, ref-counted, with a prefix cache keyed by block content.

A full block's key is a hash of its token ids (and of the content keys of the images/videos whose pads it holds)
chained with the key of the block before it, so equal keys mean equal whole prefixes. A block whose last reference goes stays in the cache (evictable, least recently freed
first) until its memory is needed; a later sequence with the same prefix takes it back instead of recomputing.

Invariant: every block is exactly one of free, evictable (cached, unreferenced) or referenced;
`num_free_blocks` counts the first two.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict

from s1serve.engine.request import Sequence


def block_hash(parent: bytes, token_ids: list[int], media: bytes = b"") -> bytes:
    """`media`: the content keys of the images/videos whose pads the block holds (equal pad ids, other pictures)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes() + media).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Lowest ids first: on CPU the cache pages a block touches are only committed when first written.
        self._free = list(range(num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # cached block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _key(self, seq: Sequence, index: int) -> bytes:
        """Key of the sequence's full block `index`; keys of earlier blocks are memoised on the sequence."""
        while len(seq.block_hashes) <= index:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            start, end = i * self.block_size, (i + 1) * self.block_size
            seq.block_hashes.append(block_hash(parent, seq.token_ids[start:end], seq.request.media_hash(start, end)))
        return seq.block_hashes[index]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the sequence's leading full blocks. At least its last token is left to compute,
        since the step that computes it yields the logits to sample from. None at all while the sequence's
        request still needs logits at its prompt positions (prompt logprobs: a cached block has none)."""
        if not self.enable_caching or seq.request.needs_prompt_logprobs:
            return []
        blocks = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self._block_of.get(self._key(seq, i))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_admit(self, cached: list[int], num_new_tokens: int) -> bool:
        """Whether a waiting sequence with these cached blocks can get blocks for num_new_tokens more."""
        needed = self.blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        reclaimed = sum(1 for b in cached if b in self._evictable)
        return needed <= self.num_free_blocks - reclaimed

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Gives a waiting sequence its cached prefix blocks; they count as computed."""
        assert not seq.block_table
        for block in cached:
            self._evictable.pop(block, None)
            self._ref[block] += 1
        seq.block_table = list(cached)
        seq.num_cached_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_computed_tokens
        if seq.num_tokens == seq.num_prompt_tokens:  # not a preempted sequence coming back
            seq.num_prefix_hit_tokens = seq.num_computed_tokens

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Appends blocks until the table holds num_tokens tokens."""
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._ref[block] = 1
        return block

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the sequence's computed full blocks in the prefix cache (first copy of a prefix wins)."""
        if not self.enable_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_cached_blocks, full):
            key = self._key(seq, i)
            if key not in self._block_of:
                self._block_of[key] = seq.block_table[i]
                self._hash_of[seq.block_table[i]] = key
        seq.num_cached_blocks = full

    def share_prefix(self, parent: Sequence, child: Sequence) -> None:
        """Gives a fork the parent's computed full blocks; the child recomputes the partial tail block."""
        full = parent.num_computed_tokens // self.block_size
        child.block_table = parent.block_table[:full]
        child.block_hashes = parent.block_hashes[:full]
        for block in child.block_table:
            self._ref[block] += 1
        child.num_computed_tokens = full * self.block_size
        child.num_cached_blocks = full

    def free(self, seq: Sequence) -> None:
        """Drops the sequence's references, tail first, so that cached tails are evicted before their prefixes."""
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forgets every unreferenced cached block."""
        for block in list(self._evictable):
            del self._block_of[self._hash_of.pop(block)]
            heapq.heappush(self._free, block)
        self._evictable.clear()
