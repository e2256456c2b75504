"""User-facing errors: each says what was wrong and where, in one line."""


class S1ServeError(Exception):
    """Base of every error caused by user input (files, flags, requests), printed without a traceback."""


class ConfigError(S1ServeError, ValueError):
    """A checkpoint's config.json / generation_config.json is missing, malformed or inconsistent."""


class CheckpointError(S1ServeError, ValueError):
    """A checkpoint's weights are missing, truncated or of the wrong shape."""
