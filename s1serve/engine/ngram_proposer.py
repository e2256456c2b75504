"""N-gram (prompt lookup) drafts: the tokens that followed an earlier occurrence of the sequence's last tokens.

Model-agnostic speculation: no draft model, only the sequence's own tokens (prompt + output). The longest suffix
of n tokens (n from `max_n` down to `min_n`) that occurred before is looked up, its most recent earlier
occurrence wins, and the up to k tokens that followed it are the drafts. One vectorised pass finds the earlier
positions of the last token; only those are extended backwards, so a step costs O(len) plus O(matches * max_n).
"""

from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, k: int, max_n: int, min_n: int):
        self.k = k
        self.max_n = max_n
        self.min_n = min_n

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to min(k, limit) drafts to follow token_ids; [] when no suffix of at least min_n tokens recurs."""
        count = min(self.k, limit)
        length = len(token_ids)
        if count < 1 or length <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        best_n, best_end = 0, -1
        # Candidate ends j (an earlier token equal to the last one), most recent first; j + 1 < length always.
        for j in np.flatnonzero(tokens[:-1] == tokens[-1])[::-1].tolist():
            n = 1
            while n < self.max_n and n <= j and tokens[j - n] == tokens[length - 1 - n]:
                n += 1
            if n > best_n:
                best_n, best_end = n, j
                if n == self.max_n:
                    break
        if best_n < self.min_n:
            return []
        return token_ids[best_end + 1 : best_end + 1 + count]
