"""What the node agent runs for a container, as pure functions of the pod: argv, environment, volumes,
ports and user. No processes and no API calls here, so each rule has a unit test.

There are no images on this node: an image maps to a local command (the chart's and the operator's
image to this project's own `orca` entry point), and a container's `command` runs as given. The
process sees the node's filesystem, so a volume is a directory on the node and an environment
value naming a mount path is rewritten to that directory.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Obj = dict[str, Any]

ORCA_IMAGE = "ghcr.io/orca-serve/orca"
ORCA_ENTRY_POINT = (sys.executable, "-m", "orca.engine.cli")
_VARIABLE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodSpecError(ValueError):
    """A pod this node cannot run; the message names the field and becomes the container's waiting reason."""


def image_repository(image: str) -> str:
    """`repo[:tag][@digest]` without the tag and digest (a registry port is not a tag)."""
    name = image.split("@", 1)[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    return name[:colon] if colon > slash else name


def entry_point(image: str, image_map: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    repository = image_repository(image)
    if repository not in image_map:
        raise PodSpecError(f"image {image!r} is not mapped to a local command on this node "
                           f"(mapped: {', '.join(sorted(image_map))}); set the container's command or "
                           f"start the node with --image {repository}=COMMAND")
    return image_map[repository]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, unknown ones kept, `$$` escapes."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VARIABLE.sub(replace, text)


def argv(container: Obj, env: dict[str, str], image_map: dict[str, tuple[str, ...]]) -> list[str]:
    """`command` replaces the image's entry point and `args` its arguments, as in a container runtime."""
    command = container.get("command")
    head = [expand(part, env) for part in command] if command else list(entry_point(container.get("image", ""), image_map))
    return head + [expand(part, env) for part in container.get("args") or []]


def field_ref(pod: Obj, path: str, node_name: str, host_ip: str) -> str:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    simple = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
              "metadata.uid": meta.get("uid"), "spec.nodeName": node_name, "status.hostIP": host_ip,
              "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
              "status.podIP": status.get("podIP"), "status.podIPs": status.get("podIP")}
    if path in simple:
        return simple[path] or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    raise PodSpecError(f"env valueFrom.fieldRef.fieldPath {path!r} is not supported")


def environment(pod: Obj, container: Obj, node_name: str, host_ip: str,
                read_key: Callable[[str, str, str, bool], Any]) -> dict[str, str]:
    """The container's variables in order (`envFrom`, then `env`, later ones seeing earlier ones).

    `read_key(kind, name, key, optional)` reads a ConfigMap's or Secret's key, or all its data when `key` is
    empty; None skips the variable (an optional reference to something missing).
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        for kind in ("configMapRef", "secretRef"):
            if kind in source:
                ref = source[kind]
                values = read_key(kind, ref["name"], "", bool(ref.get("optional")))
                for key, value in (values or {}).items():
                    env[source.get("prefix", "") + key] = value
    for index, variable in enumerate(container.get("env") or []):
        name = variable["name"]
        if "value" in variable:
            env[name] = expand(str(variable["value"]), env)
            continue
        source = variable.get("valueFrom") or {}
        if "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"], node_name, host_ip)
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "secretKeyRef" if "secretKeyRef" in source else "configMapKeyRef"
            ref = source[kind]
            value = read_key(kind, ref["name"], ref["key"], bool(ref.get("optional")))
            if value is not None:
                env[name] = value
        elif "resourceFieldRef" in source:
            env[name] = resource_field(container, source["resourceFieldRef"])
        elif not source:
            env[name] = ""
        else:
            raise PodSpecError(f"env[{index}] ({name}): valueFrom {sorted(source)} is not supported")
    return env


def resource_field(container: Obj, ref: Obj) -> str:
    resource = ref["resource"]  # e.g. limits.cpu, requests.memory
    section, _, name = resource.partition(".")
    value = ((container.get("resources") or {}).get(section) or {}).get(name)
    if value is None:
        raise PodSpecError(f"env resourceFieldRef {resource!r}: the container sets no {resource}")
    return str(value)


@dataclass(frozen=True)
class Volume:
    name: str
    mount_path: str
    host_path: Path
    read_only: bool


def volumes(pod: Obj, container: Obj, pod_dir: Path) -> list[Volume]:
    """emptyDir: a directory of the pod (it outlives container restarts, not the pod); hostPath: the path."""
    declared = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
    mounted = []
    for mount in container.get("volumeMounts") or []:
        volume = declared.get(mount["name"])
        if volume is None:
            raise PodSpecError(f"volumeMounts {mount['name']!r}: no volume of that name in spec.volumes")
        if "emptyDir" in volume:
            path = pod_dir / "volumes" / mount["name"]
        elif "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
        else:
            kind = next((k for k in volume if k != "name"), "?")
            raise PodSpecError(f"volume {mount['name']!r}: {kind} volumes are not supported by this node")
        mounted.append(Volume(mount["name"], mount["mountPath"].rstrip("/") or "/", path, bool(mount.get("readOnly"))))
    return mounted


def rewrite_mount_paths(env: dict[str, str], mounts: list[Volume]) -> dict[str, str]:
    """A value equal to a mount path, or under one, now names the node's directory for it."""
    by_length = sorted(mounts, key=lambda v: len(v.mount_path), reverse=True)
    rewritten = {}
    for key, value in env.items():
        for mount in by_length:
            if value == mount.mount_path or value.startswith(mount.mount_path + "/"):
                value = str(mount.host_path) + value[len(mount.mount_path):]
                break
        rewritten[key] = value
    return rewritten


def port_number(container: Obj, port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise PodSpecError(f"probe port {port!r} names no port of container {container.get('name')!r}")


@dataclass(frozen=True)
class User:
    uid: int | None
    gid: int | None
    groups: tuple[int, ...] = field(default_factory=tuple)


def user(pod: Obj, container: Obj) -> User:
    """The container's securityContext over the pod's: the user the process should run as."""
    pod_context = (pod.get("spec") or {}).get("securityContext") or {}
    context = {**pod_context, **(container.get("securityContext") or {})}
    uid, gid = context.get("runAsUser"), context.get("runAsGroup")
    if context.get("runAsNonRoot") and uid == 0:
        raise PodSpecError("securityContext.runAsNonRoot is true but runAsUser is 0")
    groups = tuple(g for g in (pod_context.get("fsGroup"), *(pod_context.get("supplementalGroups") or [])) if g is not None)
    return User(uid, gid if gid is not None else uid, groups)
