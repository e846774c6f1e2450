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
    p = subparsers.add_parser("router", help="route OpenAI requests to the best-scored replica",
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
    scoring = p.add_argument_group(
        "scoring", "each ready replica scores waiting-weight * waiting + running-weight * running (counting "
        "requests routed since the last scrape) + kv-cache-weight * KV cache usage (0..1); the lowest wins, "
        "unless the replica that last served the request's prompt prefix scores within --affinity-bound of it")
    scoring.add_argument("--waiting-weight", type=float, default=1.0, help="per queued request (default: 1)")
    scoring.add_argument("--running-weight", type=float, default=1.0, help="per running request (default: 1)")
    scoring.add_argument("--kv-cache-weight", type=float, default=4.0,
                         help="times the KV cache usage fraction (default: 4: a full cache counts as 4 requests)")
    scoring.add_argument("--prefix-affinity", action=argparse.BooleanOptionalAction, default=True,
                         help="send requests sharing a prompt prefix to the replica likely to have it cached "
                              "(default: on; off: no prompt is tokenized)")
    scoring.add_argument("--affinity-bound", type=float, default=4.0,
                         help="how much higher than the best score the prefix's replica may score and still get "
                              "the request (default: 4)")
    scoring.add_argument("--block-size", type=int, default=16,
                         help="the engines' KV block size, so prefix blocks line up with their cache (default: 16)")
    scoring.add_argument("--tokenizer", default="bundled",
                         help="'bundled' (the bundled model's; the default), a .gguf file or Hugging Face directory "
                              "of the served model, or 'none' (prefix affinity off)")
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


def check_scoring_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag; without importing the router, so a wrong flag answers at once."""
    for flag in ("--waiting-weight", "--running-weight", "--kv-cache-weight", "--affinity-bound"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if not value >= 0:  # NaN fails too
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    tokenizer = args.tokenizer
    if args.prefix_affinity and tokenizer not in ("bundled", "none") and not (
            os.path.isdir(tokenizer) or (tokenizer.endswith(".gguf") and os.path.isfile(tokenizer))):
        raise ValueError(f"--tokenizer {tokenizer!r}: expected 'bundled', 'none', an existing .gguf file or a "
                         f"Hugging Face model directory")


def cmd_router(args: argparse.Namespace) -> int:
    source = endpoint_source(args)  # before any import, so a wrong flag answers at once
    check_scoring_args(args)

    import uvicorn

    from .policy import ScoringWeights
    from .prompts import PromptHasher, load_tokenizer
    from .proxy import build_app
    from .replicas import ReplicaSet

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape would bury the router's own
    log = logging.getLogger("orca.router")
    weights = ScoringWeights(args.waiting_weight, args.running_weight, args.kv_cache_weight, args.prefix_affinity,
                             args.affinity_bound)
    tokenizer = None
    if args.prefix_affinity:  # off: the tokenizer is never needed, so not even loaded
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except (OSError, NotImplementedError) as error:  # affinity is an optimization: route by score without it
            log.warning("prefix affinity off: no tokenizer from --tokenizer %s (%s)", args.tokenizer, error)
    hasher = PromptHasher(tokenizer, args.block_size) if tokenizer is not None else None
    log.info("scoring %s; prefix affinity %s", weights,
             f"on ({args.tokenizer} tokenizer, blocks of {args.block_size})" if hasher else "off")
    replica_set = ReplicaSet(source, scrape_interval=args.scrape_interval, scrape_timeout=args.scrape_timeout,
                             weights=weights)
    log.info("routing on http://%s:%d", args.host, args.port)
    uvicorn.run(build_app(replica_set, prompt_hasher=hasher), host=args.host, port=args.port,
                log_level=args.log_level)
    return 0
