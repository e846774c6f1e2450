"""`orca dev cluster up|down` and `orca dev node`: the whole system on one machine."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _image(value: str) -> tuple[str, tuple[str, ...]]:
    repository, sep, command = value.partition("=")
    if not sep or not repository or not command:
        raise argparse.ArgumentTypeError(f"--image {value!r}: expected REPOSITORY=COMMAND")
    return repository, tuple(command.split())


def add_dev_args(subparsers: argparse._SubParsersAction) -> None:
    from .cluster import default_state_dir

    dev = subparsers.add_parser("dev", help="a development Kubernetes cluster on this machine")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    cluster = dev_sub.add_parser("cluster", help="start or stop the one-machine cluster")
    cluster.add_argument("action", choices=("up", "down"))
    cluster.add_argument("--state-dir", type=Path, default=default_state_dir(),
                         help="where the cluster keeps everything (default: %(default)s)")
    cluster.add_argument("--gpus", type=int, default=0,
                         help="advertise this many nvidia.com/gpu on the node so GPU pods schedule (none run)")
    cluster.set_defaults(func=cmd_cluster)
    node = dev_sub.add_parser("node", help="run a node agent: pods as local processes (started by `cluster up`)")
    node.add_argument("--kubeconfig", required=True)
    node.add_argument("--name", default="orca-dev")
    node.add_argument("--state-dir", type=Path, required=True)
    node.add_argument("--gpus", type=int, default=0)
    node.add_argument("--kubelet-port", type=int, default=10250)
    node.add_argument("--image-cache", type=Path, default=None,
                      help="what images would have built in, such as compiled kernels (default: one per checkout under ~/.cache/orca/dev-node)")
    node.add_argument("--image", type=_image, action="append", default=[],
                      help="map an image repository to a local command, REPOSITORY=COMMAND (repeatable)")
    node.set_defaults(func=cmd_node)


def _quiet_self_signed_warnings() -> None:
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # the dev API server's own certificate


def cmd_cluster(args: argparse.Namespace) -> int:
    from . import cluster

    _quiet_self_signed_warnings()
    if args.gpus < 0:
        raise ValueError(f"--gpus must be >= 0, got {args.gpus}")
    if args.action == "up":
        print(cluster.usage(cluster.up(args.state_dir, args.gpus)))
    else:
        stopped = cluster.down(args.state_dir)
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from kubernetes import config

    from .node_agent import NodeAgent, run_agent

    _quiet_self_signed_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = NodeAgent(config.new_client_from_config(args.kubeconfig), args.name, args.state_dir, args.gpus,
                      dict(args.image), args.kubelet_port, image_cache=args.image_cache)
    run_agent(agent)
    return 0
