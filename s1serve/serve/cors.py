"""Browser cross-origin access (CORS) for the api_server and the proxy: off unless --allowed-origins is given.

vLLM's flag names; unlike vLLM (whose default is every origin), no CORS header is sent by default, so a web
page on another origin cannot read the server's answers. The CORS middleware sits outside the API-key check
(s1serve.serve.auth): browsers send preflight OPTIONS requests without credentials.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from starlette.middleware.cors import CORSMiddleware


def string_list(text: str) -> list[str]:
    """A JSON list as vLLM takes it (`'["https://a.example"]'`), or comma-separated values."""
    if text.lstrip().startswith("["):
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def add_cors_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("CORS (browser access from other origins; off by default)")
    group.add_argument("--allowed-origins", type=string_list, default=None,
                       help='origins allowed to call from a browser, e.g. \'["https://app.example"]\' or "*" '
                            "(default: none, no CORS headers)")
    group.add_argument("--allowed-methods", type=string_list, default=["*"], help="with --allowed-origins")
    group.add_argument("--allowed-headers", type=string_list, default=["*"], help="with --allowed-origins")
    group.add_argument("--allow-credentials", action="store_true", help="with --allowed-origins")


@dataclass(frozen=True)
class CorsSettings:
    allowed_origins: tuple[str, ...] = ()  # empty: CORS off
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CorsSettings:
        return cls(tuple(args.allowed_origins or ()), tuple(args.allowed_methods), tuple(args.allowed_headers),
                   args.allow_credentials)


    def options(self) -> dict[str, Any]:
        """Starlette CORSMiddleware's keyword arguments."""
        return {"allow_origins": self.allowed_origins, "allow_methods": self.allowed_methods,
                "allow_headers": self.allowed_headers, "allow_credentials": self.allow_credentials}


def with_cors(app: Any, cors: CorsSettings) -> Any:
    """`app` behind CORSMiddleware when origins are allowed, else `app` itself."""
    return CORSMiddleware(app, **cors.options()) if cors.allowed_origins else app
