"""One pod on the development node: its containers as local process groups, their probes, restarts
with back-off, termination with the grace period, and the pod status the kubelet would report.

Each pod runs in its own thread; everything it reports goes through `report(status)`, and the
agent owns the API. Each container run is recorded in the cluster's process table, so
`orca dev cluster down` can stop it even if the agent itself was killed.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import container_spec
from .container_spec import Obj, PodSpecError
from .probes import ProbeState, run_probe
from .processes import ProcessTable

log = logging.getLogger("orca.dev.node")
BACKOFF_INITIAL_SECONDS, BACKOFF_MAX_SECONDS = 10.0, 300.0
BACKOFF_RESET_SECONDS = 600.0  # a container that ran this long starts its back-off over
TICK_SECONDS = 0.2


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class NodeContext:
    """What every pod on the node shares."""
    node_name: str
    host_ip: str
    image_map: dict[str, tuple[str, ...]]
    bind_library: Path  # bind_pod_ip.c, compiled
    image_cache: Path  # stands in for what an image would have built in (compiled kernels)
    table: ProcessTable
    read_key: Callable[[str, str, str, str, bool], Any]  # (namespace, kind, name, key, optional)
    service_account_kubeconfig: Callable[[Obj, Path], Path | None]
    image_pulled: Callable[[str], bool]


@dataclass
class ContainerRun:
    spec: Obj
    process: subprocess.Popen | None = None
    started_at: str | None = None
    started_monotonic: float = 0.0
    restart_count: int = 0
    runs: int = 0
    quick_exits: int = 0  # exits in a row, each after less than BACKOFF_RESET_SECONDS of running
    next_start: float = 0.0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None
    startup: ProbeState | None = None
    env: dict[str, str] = field(default_factory=dict)
    done: bool = False  # terminated and not to be restarted
    stopping: bool = False  # a failed liveness probe is stopping it (in a thread of its own)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def ready(self) -> bool:
        if not self.running or self.stopping or (self.startup and not self.startup.passing):
            return False
        return self.readiness.passing if self.readiness else True


class PodRuntime(threading.Thread):
    def __init__(self, pod: Obj, pod_ip: str, pod_dir: Path, node: NodeContext,
                 report: Callable[[PodRuntime, Obj], None]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}-{meta['name']}", daemon=True)
        self.pod, self.pod_ip, self.pod_dir, self.node, self.report = pod, pod_ip, pod_dir, node, report
        self.containers = [ContainerRun(c) for c in pod["spec"]["containers"]]
        self.start_time = now_rfc3339()
        self.conditions: dict[str, Obj] = {}
        self.delete_grace: float | None = None  # set when the pod is being deleted
        self.finished = threading.Event()  # every process has stopped after a deletion
        self.failure: str | None = None
        self._last_status: Obj | None = None
        self._set_condition("PodScheduled", True)  # bound by the scheduler before this node saw it
        self._set_condition("Initialized", True)  # no init containers to wait for

    @property
    def key(self) -> str:
        meta = self.pod["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    @property
    def uid(self) -> str:
        return self.pod["metadata"]["uid"]

    def request_delete(self, grace_seconds: float) -> None:
        if self.delete_grace is None or grace_seconds < self.delete_grace:
            self.delete_grace = grace_seconds

    # --- the pod's loop -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._prepare()
            while self.delete_grace is None:
                self._tick()
                self._publish()
                time.sleep(TICK_SECONDS)
            self._terminate(self.delete_grace)
        except Exception as e:  # a bug here must not leave processes behind
            log.exception("pod %s failed", self.key)
            self.failure = str(e)
            self._terminate(0)
        finally:
            try:
                self._publish()
            except Exception:
                log.exception("pod %s: last status report failed", self.key)
            self.finished.set()

    def _prepare(self) -> None:
        (self.pod_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.pod_dir.chmod(0o755)
        self.service_kubeconfig = self.node.service_account_kubeconfig(self.pod, self.pod_dir)

    def _tick(self) -> None:
        now = time.monotonic()
        restart_policy = self.pod["spec"].get("restartPolicy", "Always")
        for run in self.containers:
            if run.process is not None and run.process.poll() is not None:
                self._record_exit(run, restart_policy)
            if run.process is None and not run.done and now >= run.next_start:
                self._start(run)
            if run.running and not run.stopping:
                self._probe(run, now)

    def _start(self, run: ContainerRun) -> None:
        meta, container = self.pod["metadata"], run.spec
        if not container.get("command") and not self.node.image_pulled(container.get("image", "")):
            run.state = {"waiting": {"reason": "ContainerCreating", "message": f"pulling image {container.get('image')}"}}
            return
        try:
            pod_with_ip = {**self.pod, "status": {**(self.pod.get("status") or {}), "podIP": self.pod_ip}}
            env = container_spec.environment(pod_with_ip, container, self.node.node_name, self.node.host_ip,
                                             lambda kind, name, key, optional: self.node.read_key(
                                                 meta["namespace"], kind, name, key, optional))
            mounts = container_spec.volumes(self.pod, container, self.pod_dir)
            for mount in mounts:
                mount.host_path.mkdir(parents=True, exist_ok=True)
            env = container_spec.rewrite_mount_paths(env, mounts)
            argv = container_spec.argv(container, env, self.node.image_map)
            user = container_spec.user(self.pod, container)
        except Exception as e:  # a bad spec, or the API server unreachable for a key: retry after a back-off
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            run.next_start = time.monotonic() + BACKOFF_INITIAL_SECONDS
            return
        home = self.pod_dir / "home"
        home.mkdir(exist_ok=True)
        process_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(home),
                       "HOSTNAME": meta["name"]}
        mapped = not container.get("command")
        if mapped:  # this project's entry point: what its image would set
            process_env |= {"PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1",
                            "TORCH_EXTENSIONS_DIR": str(self.node.image_cache / "torch_extensions")}
        if self.service_kubeconfig is not None:
            process_env["KUBECONFIG"] = str(self.service_kubeconfig)
        process_env |= env
        process_env |= {"ORCA_DEV_POD_IP": self.pod_ip, "LD_PRELOAD": str(self.node.bind_library)}
        run.env = process_env
        log_path = self.log_path(container["name"], run.runs)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        executable = shutil.which(argv[0], path=process_env["PATH"]) or argv[0]
        try:
            credentials = self._credentials(user, executable, mounts, home)
        except OSError as e:
            run.state = {"waiting": {"reason": "CreateContainerError", "message": str(e)}}
            run.next_start = time.monotonic() + BACKOFF_INITIAL_SECONDS
            return
        cwd = container.get("workingDir") or str(self.pod_dir)
        with open(log_path, "ab") as out:
            try:
                run.process = subprocess.Popen(argv, env=process_env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True, **credentials)
            except OSError as e:
                run.state = {"waiting": {"reason": "RunContainerError", "message": f"{argv[0]}: {e}"}}
                run.next_start = time.monotonic() + BACKOFF_INITIAL_SECONDS
                return
        self.node.table.record(self._process_name(run), run.process.pid)
        run.runs += 1
        run.started_at, run.started_monotonic = now_rfc3339(), time.monotonic()
        run.state = {"running": {"startedAt": run.started_at}}
        started = run.started_monotonic
        run.readiness = ProbeState(container["readinessProbe"], started) if container.get("readinessProbe") else None
        run.liveness = ProbeState(container["livenessProbe"], started) if container.get("livenessProbe") else None
        run.startup = ProbeState(container["startupProbe"], started) if container.get("startupProbe") else None
        if run.liveness:
            run.liveness.passing = True
        log.info("pod %s: started %s (pid %d) at %s: %s", self.key, container["name"], run.process.pid,
                 self.pod_ip, " ".join(argv))

    def _credentials(self, user: container_spec.User, executable: str, mounts: list[container_spec.Volume],
                     home: Path) -> dict[str, Any]:
        """Run as the pod's user where this node can: it is root and that user can reach what it runs."""
        if os.geteuid() != 0 or user.uid is None or user.uid == 0:
            return {}
        needed = [Path(executable), Path(container_spec.__file__), self.node.bind_library, self.pod_dir,
                  self.node.image_cache]
        if not all(_reachable_by_others(path) for path in needed):
            log.warning("pod %s: running as this node's user, not uid %d: %s is not readable by other users",
                        self.key, user.uid, next(p for p in needed if not _reachable_by_others(p)))
            return {}
        for path in [home, self.pod_dir / "logs", *(m.host_path for m in mounts if not m.read_only)]:
            if path.is_relative_to(self.pod_dir):
                os.chown(path, user.uid, user.gid if user.gid is not None else -1)
        return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}

    def _record_exit(self, run: ContainerRun, restart_policy: str) -> None:
        assert run.process is not None
        code = run.process.returncode
        self.node.table.forget(self._process_name(run))
        _kill_group(run.process.pid, signal.SIGKILL)  # whatever the container left behind in its group
        reason = "Completed" if code == 0 else "Error"
        run.last_state = {"terminated": {"exitCode": code if code >= 0 else 128 - code, "reason": reason,
                                         "startedAt": run.started_at, "finishedAt": now_rfc3339(),
                                         **({"signal": -code} if code < 0 else {})}}
        ran_for = time.monotonic() - run.started_monotonic
        run.process, run.readiness, run.liveness, run.startup, run.stopping = None, None, None, None, False
        restart = restart_policy == "Always" or (restart_policy == "OnFailure" and code != 0)
        if not restart or self.delete_grace is not None:
            run.state, run.done = run.last_state, True
            return
        # The first restart is at once; each further one after a short run waits twice as long as the last.
        run.quick_exits = 0 if ran_for >= BACKOFF_RESET_SECONDS else run.quick_exits + 1
        delay = 0.0 if run.quick_exits <= 1 else min(BACKOFF_INITIAL_SECONDS * 2 ** (run.quick_exits - 2),
                                                     BACKOFF_MAX_SECONDS)
        run.restart_count += 1
        run.next_start = time.monotonic() + delay
        run.state = {"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off {delay:.0f}s restarting failed container={run.name}"}} \
            if delay else {"waiting": {"reason": "ContainerCreating"}}
        log.info("pod %s: %s exited with %s; restart %d in %.0fs", self.key, run.name, code, run.restart_count, delay)

    def _probe(self, run: ContainerRun, now: float) -> None:
        for kind in ("startup", "liveness", "readiness"):
            state: ProbeState | None = getattr(run, kind)
            if state is None or not state.due(now) or (kind != "startup" and run.startup and not run.startup.passing):
                continue
            if kind == "startup" and state.passing:
                continue
            try:
                ok = run_probe(state.probe, run.spec, self.pod_ip, run.env)
            except PodSpecError as e:
                log.warning("pod %s: %s", self.key, e)
                ok = False
            state.record(ok, time.monotonic())
            if kind in ("liveness", "startup") and state.failed:
                log.info("pod %s: %s probe failed %d times; restarting %s", self.key, kind, state.failures, run.name)
                run.stopping = True  # not ready from now on; the loop keeps reporting while it stops
                threading.Thread(target=self._stop_container, args=(run, self._grace_seconds()), daemon=True).start()
                return

    # --- termination ----------------------------------------------------------------------------
    def _grace_seconds(self) -> float:
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def _terminate(self, grace_seconds: float) -> None:
        """preStop hooks, then SIGTERM, then SIGKILL at the end of the grace period, for every container."""
        deadline = time.monotonic() + grace_seconds
        running = [run for run in self.containers if run.running]
        hooks = [threading.Thread(target=self._stop_container, args=(run, grace_seconds), daemon=True) for run in running]
        for hook in hooks:
            hook.start()
        for hook in hooks:
            hook.join(max(0.0, deadline - time.monotonic()) + 5)
        for run in self.containers:
            if run.process is not None:
                _kill_group(run.process.pid, signal.SIGKILL)
                run.process.wait()
                self._record_exit(run, "Never")
            run.done = True

    def _stop_container(self, run: ContainerRun, grace_seconds: float) -> None:
        process = run.process
        if process is None:
            return
        deadline = time.monotonic() + grace_seconds
        pre_stop = ((run.spec.get("lifecycle") or {}).get("preStop") or {})
        if pre_stop:  # as the kubelet does for every stop, deletion or failed liveness probe
            self._run_pre_stop(run, pre_stop, grace_seconds)
        _kill_group(process.pid, signal.SIGTERM)
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        _kill_group(process.pid, signal.SIGKILL)
        process.wait()

    def _run_pre_stop(self, run: ContainerRun, hook: Obj, grace_seconds: float) -> None:
        try:
            if "exec" in hook:
                subprocess.run(hook["exec"]["command"], env=run.env, timeout=grace_seconds, capture_output=True)
            elif "httpGet" in hook:
                run_probe({"httpGet": hook["httpGet"], "timeoutSeconds": grace_seconds}, run.spec, self.pod_ip, run.env)
        except (OSError, subprocess.TimeoutExpired, PodSpecError) as e:
            log.warning("pod %s: preStop hook of %s failed: %s", self.key, run.name, e)

    # --- status ---------------------------------------------------------------------------------
    def _set_condition(self, kind: str, ok: bool) -> None:
        value = "True" if ok else "False"
        if self.conditions.get(kind, {}).get("status") != value:
            self.conditions[kind] = {"type": kind, "status": value, "lastProbeTime": None,
                                     "lastTransitionTime": now_rfc3339()}

    def status(self) -> Obj:
        ready = all(run.ready for run in self.containers) and self.delete_grace is None
        self._set_condition("ContainersReady", ready)
        self._set_condition("Ready", ready)
        if all(run.done for run in self.containers):
            phase = "Succeeded" if all(run.last_state.get("terminated", {}).get("exitCode") == 0
                                       for run in self.containers) else "Failed"
        elif any(run.runs for run in self.containers):
            phase = "Running"
        else:
            phase = "Pending"
        return {"phase": phase, "hostIP": self.node.host_ip, "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}],
                "startTime": self.start_time,
                "conditions": [self.conditions[k] for k in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
                "containerStatuses": [self._container_status(run) for run in self.containers]}

    def _container_status(self, run: ContainerRun) -> Obj:
        status = {"name": run.name, "ready": run.ready, "restartCount": run.restart_count, "state": run.state,
                  "lastState": run.last_state, "image": run.spec.get("image", ""), "imageID": "",
                  "started": run.running}
        if run.process is not None:
            status["containerID"] = f"orca-dev://{run.process.pid}"
        return status

    def republish(self) -> None:
        """Report the status again on the next tick even if nothing changes (the last report failed)."""
        self._last_status = None

    def _publish(self) -> None:
        status = self.status()
        if status != self._last_status:
            self._last_status = status
            self.report(self, status)

    # --- logs -----------------------------------------------------------------------------------
    def log_path(self, container: str, run_index: int) -> Path:
        return self.pod_dir / "logs" / container / f"{run_index}.log"

    def current_log(self, container: str, previous: bool = False) -> Path | None:
        run = next((r for r in self.containers if r.name == container), None)
        if run is None or run.runs == 0:
            return None
        index = run.runs - 1 - (1 if previous else 0)
        return self.log_path(container, index) if index >= 0 else None

    def _process_name(self, run: ContainerRun) -> str:
        meta = self.pod["metadata"]
        return f"pod_{meta['namespace']}_{meta['name']}_{self.uid[:8]}_{run.name}"


def _kill_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reachable_by_others(path: Path) -> bool:
    """Every directory above it searchable and the file itself readable by any user."""
    path = path.resolve()
    try:
        return all(parent.stat().st_mode & 0o001 for parent in path.parents) and bool(path.stat().st_mode & 0o004)
    except OSError:
        return False
