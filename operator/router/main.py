"""`orca router`: the request path in front of an OrcaDeployment's replicas.

The flags are defined without importing the router's dependencies; `cmd_router` imports them when
the router actually starts, so building the `orca` parser stays cheap.
"""
from __future__ import annotations

import argparse
import logging
import os

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .endpoints import EndpointSource

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def add_router_args(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="route OpenAI requests to the least-loaded replica",
                              description="Exactly one of --upstream (repeatable) or --service is required.")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--upstream", action="append", default=None, metavar="URL",
                   help="a replica's root URL, e.g. http://10.0.0.5:8000 (repeatable; for use outside a cluster)")
    p.add_argument("--service", default=None,
                   help="route to the endpoints of this Kubernetes Service (an OrcaDeployment's NAME-engine)")
    p.add_argument("--namespace", default=None,
                   help="the Service's namespace (default: $POD_NAMESPACE, else the pod's own, else 'default')")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between probes of each replica")
    p.add_argument("--scrape-timeout", type=float, default=1.0, help="seconds each probe may take")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_router)


def default_namespace() -> str:
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(NAMESPACE_FILE) as file:
            return file.read().strip() or "default"
    except OSError:
        return "default"


def endpoint_source(args: argparse.Namespace) -> EndpointSource:
    """The replicas' source the flags name; ValueError (naming the flag) for any bad combination."""
    from .endpoints import EndpointsSource, StaticSource

    if args.upstream and args.service:
        raise ValueError("--upstream and --service exclude each other: give a fixed list or a Service, not both")
    if not args.upstream and not args.service:
        raise ValueError("one of --upstream URL (repeatable) or --service NAME is required")
    if args.scrape_interval <= 0:
        raise ValueError(f"--scrape-interval must be > 0, got {args.scrape_interval}")
    if args.scrape_timeout <= 0:
        raise ValueError(f"--scrape-timeout must be > 0, got {args.scrape_timeout}")
    if args.upstream:
        if args.namespace is not None:
            raise ValueError("--namespace applies only with --service")
        return StaticSource(args.upstream)
    return EndpointsSource(args.service, args.namespace or default_namespace())


def cmd_router(args: argparse.Namespace) -> int:
    source = endpoint_source(args)  # before any import, so a wrong flag answers at once

    import uvicorn

    from .proxy import build_app
    from .replicas import ReplicaSet

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape would bury the router's own
    replica_set = ReplicaSet(source, scrape_interval=args.scrape_interval, scrape_timeout=args.scrape_timeout)
    logging.getLogger("orca.router").info("routing on http://%s:%d", args.host, args.port)
    uvicorn.run(build_app(replica_set), host=args.host, port=args.port, log_level=args.log_level)
    return 0
