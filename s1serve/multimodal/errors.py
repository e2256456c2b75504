"""The one error type of media handling: what was wrong with which item, and the HTTP status it maps to."""

from __future__ import annotations

from s1serve.errors import S1ServeError


class MediaError(S1ServeError, ValueError):
    """A media item (or the request's set of items) that cannot be used.

    `status` is 400 for bad input (undecodable, refused address, bad option) and 413 for input over a size
    limit (bytes, pixels, frames, items). The message names the item ("image 2", "video 1") and the limit.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        if status not in (400, 413):
            raise ValueError(f"MediaError status must be 400 or 413, got {status}")
        super().__init__(message)
        self.status = status
        self.message = message
