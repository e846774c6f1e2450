"""The one place that writes children to the cluster: create what is missing, patch what drifted,
leave alone what is already right (an operator restart must change nothing)."""
from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

Obj = dict[str, Any]


def is_subset(want: Any, have: Any) -> bool:
    """True when every field we set has that value live; fields the API server defaulted are ignored."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(is_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(is_subset, want, have))
    return want == have or (want is not None and str(want) == str(have))


class Applier:
    def __init__(self, api: client.ApiClient) -> None:
        self.dynamic = _Dynamic(api)

    def apply(self, obj: Obj) -> str:
        """Returns what happened: created, patched or unchanged."""
        meta = obj["metadata"]
        live = self.dynamic.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if live is None:
            self.dynamic.create(obj)
            return "created"
        if is_subset({k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}, live):
            return "unchanged"
        self.dynamic.patch(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"], obj)
        return "patched"

    def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: Obj) -> None:
        """A merge patch of an object the operator does not own (an engine pod's stage label); one
        deleted meanwhile needs no patch."""
        try:
            self.dynamic.patch(api_version, kind, namespace, name, patch)
        except NotFoundError:
            pass

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.dynamic.delete(api_version, kind, namespace, name)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        return self.dynamic.get(api_version, kind, namespace, name) if name else None

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[Obj]:
        return self.dynamic.list(api_version, kind, namespace, selector)

    def serves(self, api_version: str, kind: str) -> bool:
        try:
            self.dynamic.resource(api_version, kind)
            return True
        except ResourceNotFoundError:
            return False


class _Dynamic:
    """Calls by apiVersion/kind through the client's discovery, so one code path serves every child type."""

    def __init__(self, api: client.ApiClient) -> None:
        self.client = DynamicClient(api)

    def resource(self, api_version: str, kind: str) -> Any:
        return self.client.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[Obj]:
        return self.resource(api_version, kind).get(namespace=namespace, label_selector=selector).to_dict()["items"]

    def create(self, obj: Obj) -> None:
        self.resource(obj["apiVersion"], obj["kind"]).create(body=obj, namespace=obj["metadata"]["namespace"])

    def patch(self, api_version: str, kind: str, namespace: str, name: str, body: Obj) -> None:
        self.resource(api_version, kind).patch(body=body, name=name, namespace=namespace,
                                               content_type="application/merge-patch+json")

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace)
        except NotFoundError:
            pass
