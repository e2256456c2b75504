"""The proxy's settings and flags, shared by `s1serve serve proxy` and `python -m s1serve.serve.proxy`."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from s1serve.errors import S1ServeError
from s1serve.serve.openai.arguments import DEFAULT_MAX_BODY_BYTES, add_body_limit_argument
from s1serve.serve.auth import ADMIN_KEY_ENV, NODE_KEY_ENV, PROXY_API_KEY_ENV, key_from, keys_from
from s1serve.serve.cors import CorsSettings, add_cors_arguments
from s1serve.serve.proxy.routing import STRATEGIES

SERVING_STRATEGIES = ("Hybrid", "DistServe")
DRAINING = "the proxy is shutting down: it takes no new requests while those in flight finish"


class ProxyConfigError(S1ServeError, ValueError):
    """A proxy flag has a value the proxy cannot serve with."""


@dataclass(frozen=True)
class ProxyConfig:
    server_name: str = "0.0.0.0"
    server_port: int = 8000
    routing_strategy: str = "min_expected_latency"
    serving_strategy: str = "Hybrid"
    health_interval: float = 5.0
    health_timeout: float = 3.0
    unhealthy_after: int = 2
    connect_timeout: float = 5.0
    request_timeout: float | None = 600.0
    seed: int | None = None
    log_level: str = "info"
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # clients' keys (every route but /health)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # /nodes/*
    node_key: str | None = field(default=None, repr=False)  # sent to the nodes as Authorization: Bearer
    metrics_public: bool = False
    cors: CorsSettings = CorsSettings()

    def __post_init__(self) -> None:
        if self.serving_strategy == "DistServe":
            raise ProxyConfigError(
                "--serving-strategy DistServe (prefill/decode disaggregation) is not supported yet; use Hybrid"
            )
        if self.serving_strategy not in SERVING_STRATEGIES:
            raise ProxyConfigError(f"--serving-strategy {self.serving_strategy!r} is unknown; allowed: Hybrid")
        if self.routing_strategy not in STRATEGIES:
            allowed = ", ".join(STRATEGIES)
            raise ProxyConfigError(f"--routing-strategy {self.routing_strategy!r} is unknown; allowed: {allowed}")
        if self.health_interval <= 0 or self.health_timeout <= 0 or self.connect_timeout <= 0:
            raise ProxyConfigError("--health-interval, --health-timeout and --connect-timeout must be > 0 seconds")
        if self.unhealthy_after < 1:
            raise ProxyConfigError("--unhealthy-after must be >= 1 failed health check")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ProxyConfigError("--request-timeout must be > 0 seconds (or 0 for no limit)")
        if self.shutdown_timeout < 0:
            raise ProxyConfigError("--shutdown-timeout must be >= 0 seconds")


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    d = ProxyConfig()
    parser.add_argument("--server-name", default=d.server_name, help="address to listen on")
    parser.add_argument("--server-port", type=int, default=d.server_port, help="port to listen on")
    parser.add_argument("--routing-strategy", choices=STRATEGIES, default=d.routing_strategy,
                        help="how a request picks its node")
    # DistServe is accepted by the parser so that it is refused with a sentence, not an argparse choice list.
    parser.add_argument("--serving-strategy", choices=SERVING_STRATEGIES, default=d.serving_strategy,
                        help="Hybrid: every node prefills and decodes")
    parser.add_argument("--health-interval", type=float, default=d.health_interval,
                        help="seconds between health sweeps")
    parser.add_argument("--health-timeout", type=float, default=d.health_timeout,
                        help="seconds one node may take to answer /health")
    parser.add_argument("--unhealthy-after", type=int, default=d.unhealthy_after,
                        help="consecutive failed health checks that mark a node unhealthy")
    parser.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                        help="seconds to open an upstream connection")
    parser.add_argument("--request-timeout", type=float, default=d.request_timeout,
                        help="seconds an upstream may stay silent before the request fails with 504 (0: no limit)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the random choices (random strategy, tie breaks)")
    parser.add_argument("--log-level", default=d.log_level, choices=("debug", "info", "warning", "error"),
                        help="log threshold")
    add_body_limit_argument(parser)
    parser.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                        help="seconds SIGTERM lets forwarded requests finish (new ones get 503); a second SIGTERM "
                             "exits at once")
    keys = parser.add_argument_group("API keys (each also read from its environment variable when not given)")
    keys.add_argument("--api-key", "--api-keys", dest="api_key", nargs="*", default=None,
                      help=f"keys clients must send on every route but /health (${PROXY_API_KEY_ENV})")
    keys.add_argument("--admin-key", default=None,
                      help=f"key for /nodes/* (${ADMIN_KEY_ENV}); with --api-key and no admin key, /nodes/* "
                           "answer 403 (nodes cannot join)")
    keys.add_argument("--node-key", default=None,
                      help=f"key the proxy sends to the nodes: their --api-key (${NODE_KEY_ENV}); the clients' "
                           "keys are never forwarded")
    keys.add_argument("--metrics-public", action="store_true", help="serve /metrics without a key")
    add_cors_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(
        server_name=args.server_name,
        server_port=args.server_port,
        routing_strategy=args.routing_strategy,
        serving_strategy=args.serving_strategy,
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        unhealthy_after=args.unhealthy_after,
        connect_timeout=args.connect_timeout,
        request_timeout=args.request_timeout or None,
        seed=args.seed,
        log_level=args.log_level,
        max_request_body_bytes=args.max_request_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        api_keys=tuple(keys_from(args.api_key, (PROXY_API_KEY_ENV,))),
        admin_keys=tuple(keys_from([args.admin_key], (ADMIN_KEY_ENV,))),
        node_key=key_from(args.node_key, NODE_KEY_ENV),
        metrics_public=args.metrics_public,
        cors=CorsSettings.from_args(args),
    )


def cmd_proxy(args: argparse.Namespace) -> int:
    """Run the proxy until SIGTERM / SIGINT, then drain (the `func` of the `proxy` subcommand)."""
    import uvicorn

    from s1serve.serve.drain import DrainGate, DrainingServer
    from s1serve.serve.openai.errors import error_response
    from s1serve.serve.proxy.app import create_app

    config = config_from_args(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    gate = DrainGate(create_app(config), lambda _: error_response(503, DRAINING, kind="ServiceUnavailableError"))
    uvicorn_config = uvicorn.Config(gate, host=config.server_name, port=config.server_port,
                                    log_level=config.log_level, access_log=False)
    DrainingServer(uvicorn_config, gate, config.shutdown_timeout).run()
    return 0


def add_proxy_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `proxy` to an existing subcommand group (the lead wires it under `s1serve serve`)."""
    parser = subparsers.add_parser("proxy", help="one OpenAI-compatible endpoint in front of many api_servers")
    add_proxy_arguments(parser)
    parser.set_defaults(func=cmd_proxy)
    return parser


def main_proxy(argv: list[str] | None = None) -> int:
    """`python -m s1serve.serve.proxy`: same flags and error convention as `s1serve serve proxy`."""
    parser = argparse.ArgumentParser(prog="s1serve serve proxy", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_proxy_arguments(parser)
    try:
        return cmd_proxy(parser.parse_args(argv))
    except S1ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
