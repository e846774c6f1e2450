"""A pod of a later pipeline stage: its tensor ranks as local worker processes, and the probes.

The pod runs the same `orca serve` command as stage 0 (one StatefulSet template for every stage);
here it serves no API, only `/health` and `/ready` for the kubelet, both 200 while every local worker
is alive. It exits when a worker exits: 0 when the master shut the replica down, 1 when a worker
failed (or lost its master), so Kubernetes restarts the pod and its workers join the replica again.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..config import EngineConfig
from .contract import WorkerEnvironment
from .launch import start_worker, stop_workers, threads_per_worker

log = logging.getLogger("orca.stage")


def serve_stage(config: EngineConfig, environment: WorkerEnvironment, host: str, port: int) -> int:
    tp = environment.tensor_parallel_size
    processes = [start_worker(config, environment, rank, threads_per_worker(tp)) for rank in range(tp)]
    stopping = threading.Event()

    class Probes(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path not in ("/health", "/ready"):
                status, body = 404, b'{"status": "not found"}'
            elif all(process.poll() is None for process in processes) and not stopping.is_set():
                status, body = 200, b'{"status": "ok"}'
            else:
                status, body = 503, b'{"status": "unavailable"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # probes every few seconds: keep the log for workers
            pass

    server = ThreadingHTTPServer((host, port), Probes)
    threading.Thread(target=server.serve_forever, name="orca-probes", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    log.info("stage %d of %d: %d worker(s), probes on http://%s:%d", environment.stage,
             environment.pipeline_parallel_size, tp, host, port)
    try:
        while not stopping.is_set() and all(process.poll() is None for process in processes):
            time.sleep(0.2)
        first_exit = next((process.returncode for process in processes if process.poll() is not None), 0)
    finally:
        server.shutdown()
        stop_workers(processes)
    log.info("stage %d: a worker exited with %s", environment.stage, first_exit)
    return 0 if stopping.is_set() or first_exit == 0 else 1
