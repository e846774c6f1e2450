"""Container probes as the kubelet runs them: httpGet (2xx or 3xx passes), tcpSocket and exec, each
bounded by `timeoutSeconds`, and the counting of consecutive results against the thresholds."""
from __future__ import annotations

import http.client
import socket
import subprocess
from dataclasses import dataclass

from .container_spec import Obj, PodSpecError, port_number


def run_probe(probe: Obj, container: Obj, pod_ip: str, env: dict[str, str]) -> bool:
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        action = probe["httpGet"]
        if action.get("scheme", "HTTP").upper() != "HTTP":
            raise PodSpecError("probe httpGet.scheme: only HTTP is supported by this node")
        connection = http.client.HTTPConnection(action.get("host") or pod_ip, port_number(container, action["port"]),
                                                timeout=timeout)
        try:
            headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
            connection.request("GET", action.get("path", "/"), headers={"User-Agent": "kube-probe/1.20", **headers})
            return 200 <= connection.getresponse().status < 400
        except (OSError, http.client.HTTPException):  # refused, timed out, or not HTTP at all
            return False
        finally:
            connection.close()
    if "tcpSocket" in probe:
        action = probe["tcpSocket"]
        try:
            with socket.create_connection((action.get("host") or pod_ip, port_number(container, action["port"])),
                                          timeout=timeout):
                return True
        except OSError:
            return False
    if "exec" in probe:
        try:
            return subprocess.run(probe["exec"]["command"], env=env, timeout=timeout, capture_output=True).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    raise PodSpecError("probe: one of httpGet, tcpSocket or exec is required")


@dataclass
class ProbeState:
    """One probe of one container run: when it is next due and what the thresholds have made of it."""
    probe: Obj
    started: float  # the container's start, monotonic
    passing: bool = False
    successes: int = 0
    failures: int = 0
    next_due: float = 0.0

    def __post_init__(self) -> None:
        self.next_due = self.started + float(self.probe.get("initialDelaySeconds", 0))

    def due(self, now: float) -> bool:
        return now >= self.next_due

    def record(self, ok: bool, now: float) -> bool:
        """Count one result; True when the probe's verdict flipped."""
        self.next_due = now + float(self.probe.get("periodSeconds", 10))
        before = self.passing
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                self.passing = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= int(self.probe.get("failureThreshold", 3)):
                self.passing = False
        return before != self.passing

    @property
    def failed(self) -> bool:
        """Failed `failureThreshold` times in a row: what restarts a container for a liveness probe."""
        return self.failures >= int(self.probe.get("failureThreshold", 3))
