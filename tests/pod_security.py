"""The Pod Security Standards "restricted" profile as a check of one pod spec (Kubernetes 1.20 has no
PodSecurity admission to ask), so the operator's and the chart's pod templates are held to it."""
from __future__ import annotations

from typing import Any

WRITABLE_VOLUME_KINDS = {"emptyDir"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every field of the profile a pod spec fails, by path; empty when it would be admitted."""
    problems = []
    pod_context = pod.get("securityContext") or {}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for index, container in enumerate([*pod.get("initContainers", []), *pod["containers"]]):
        where = f"containers[{index}] ({container['name']})"
        context = {**pod_context, **(container.get("securityContext") or {})}
        own = container.get("securityContext") or {}
        if context.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot must be true")
        if not isinstance(context.get("runAsUser"), int) or context["runAsUser"] == 0:
            problems.append(f"{where}: runAsUser must be a numeric non-root user")
        if own.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if "ALL" not in ((own.get("capabilities") or {}).get("drop") or []) or (own.get("capabilities") or {}).get("add"):
            problems.append(f"{where}: capabilities must drop ALL and add none")
        if (context.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile.type must be RuntimeDefault")
        if own.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem must be true")
        if own.get("privileged"):
            problems.append(f"{where}: privileged must not be set")
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            if not mount.get("readOnly") and not WRITABLE_VOLUME_KINDS & set(volume):
                problems.append(f"{where}: volume {mount['name']} is writable but not an emptyDir")
    for name, volume in volumes.items():
        if "hostPath" in volume:  # forbidden by "baseline" already, read-only or not
            problems.append(f"volume {name}: hostPath volumes are not allowed")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("host namespaces must not be shared")
    return problems
