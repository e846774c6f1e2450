"""`orca operator`: run the kopf operator (one active replica; liveness endpoint for the kubelet)."""
from __future__ import annotations

import argparse
import asyncio


def add_operator_args(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("operator", help="run the Kubernetes operator for OrcaDeployments")
    p.add_argument("--namespace", action="append", default=None, help="watch only these namespaces (default: all)")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint URL")
    p.add_argument("--verbose", action="store_true", help="log every handler run")
    p.add_argument("--router-scoring", default="{}", metavar="JSON",
                   help="routers' scoring defaults, e.g. '{\"kvCacheWeight\": 2}' (keys of spec.router.scoring)")
    p.set_defaults(func=cmd_operator)


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers, render  # importing handlers registers them

    handlers.ROUTER_SCORING.update(render.parse_router_scoring(args.router_scoring))

    kopf.configure(verbose=args.verbose)

    asyncio.run(kopf.operator(clusterwide=not args.namespace, namespaces=args.namespace or (),
                              standalone=True, liveness_endpoint=args.liveness))
    return 0
