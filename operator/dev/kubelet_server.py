"""The part of the kubelet's HTTPS API that `kubectl logs` needs: the API server proxies
`GET /containerLogs/<namespace>/<pod>/<container>` to the node's InternalIP and kubelet port.
(Without `--kubelet-certificate-authority` the 1.20 API server does not verify the node's certificate,
so a self-signed one serves.) `tailLines`, `previous` and `follow` behave as with a kubelet."""
from __future__ import annotations

import collections
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FOLLOW_LIMIT_SECONDS = 3600.0

# (namespace, pod, container, previous) -> (log file, is the container still running?)
LogLookup = Callable[[str, str, str, bool], tuple[Path, Callable[[], bool]] | None]


def self_signed_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    cert, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not cert.exists():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
                        "-subj", f"/CN={common_name}", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def serve(host: str, port: int, certificate: tuple[Path, Path], lookup: LogLookup) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # the agent's log is for pods, not for each request
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if url.path == "/healthz":
                self._answer(200, b"ok")
                return
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._answer(404, b"not found")
                return
            query = urllib.parse.parse_qs(url.query)
            flag = lambda name: query.get(name, ["false"])[0] == "true"  # noqa: E731
            found = lookup(parts[1], parts[2], parts[3], flag("previous"))
            if found is None:
                self._answer(404, f"container {parts[3]!r} of pod {parts[1]}/{parts[2]} has no log here".encode())
                return
            path, running = found
            tail = int(query["tailLines"][0]) if "tailLines" in query else None
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            with open(path, "rb") as log:
                lines = log.readlines()
                self.wfile.write(b"".join(lines if tail is None else collections.deque(lines, maxlen=tail)))
                deadline = time.monotonic() + FOLLOW_LIMIT_SECONDS
                while flag("follow") and running() and time.monotonic() < deadline:
                    chunk = log.read()
                    if chunk:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    else:
                        time.sleep(0.2)
                self.wfile.write(log.read())

        def _answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubelet-server", daemon=True).start()
    return server
