"""The Grafana dashboard shipped in the chart (charts/orca/dashboards/orca.json) and its ConfigMap.

The dashboard may only query series the engine and the router really export: the names are read
from their own Prometheus registries, not from a list kept here. The ConfigMap template is rendered
by Helm's own library: `helm lint` (no cluster needed) runs the template engine over the chart and
fails on a template or YAML error, and a real install into the test control plane (slow, k8s)
reads the ConfigMap back from the API server.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from orca.engine.server.metrics import Metrics
from orca.operator.router.metrics import RouterMetrics

ROOT = Path(__file__).parent.parent
CHART = ROOT / "charts/orca"
DASHBOARD = CHART / "dashboards/orca.json"
TEMPLATE = CHART / "templates/grafana-dashboard.yaml"
METRIC = re.compile(r"orca:[a-zA-Z0-9_:]+")  # digits too: orca:e2e_...
DATASOURCE = "${datasource}"

# Required panels, by (a fragment of) their title, lower-cased, and the metric each must query.
REQUIRED = {
    "request throughput": {"orca:request_success_total"},
    "token throughput": {"orca:generation_tokens_total", "orca:prompt_tokens_total"},
    "time to first token": {"orca:time_to_first_token_seconds_bucket"},
    "inter-token latency": {"orca:inter_token_latency_seconds_bucket"},
    "end-to-end request latency": {"orca:e2e_request_latency_seconds_bucket"},
    "queue length per replica": {"orca:num_requests_waiting", "orca:num_requests_running"},
    "kv-cache usage per replica": {"orca:kv_cache_usage_perc"},
    "prefix cache hit rate": {"orca:prefix_cache_hits_total", "orca:prefix_cache_queries_total"},
    "replicas over time": {"orca:num_requests_running", "orca:router_replicas_ready"},
    "router requests per replica by code": {"orca:router_requests_total"},
    "router retries": {"orca:router_retries_total"},
    "router upstream errors": {"orca:router_upstream_errors_total"},
    "router upstream latency p90": {"orca:router_upstream_latency_seconds_bucket"},
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported(registry) -> set[str]:
    """Every series name a registry exposes: its samples, plus the names of labelled families that
    have no child yet (a counter's `_total`, a histogram's `_bucket`/`_sum`/`_count`)."""
    names: set[str] = set()
    for family in registry.collect():
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def metric_names() -> set[str]:
    return exported(Metrics("m").registry) | exported(RouterMetrics(lambda: 1.0).registry)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels(dashboard: dict) -> list[dict]:
    """Every non-row panel, including those nested in collapsed rows."""
    out = []
    for p in dashboard["panels"]:
        if p["type"] == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


def exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_exported_names_include_the_suffixed_series(metric_names) -> None:
    assert {"orca:request_success_total", "orca:time_to_first_token_seconds_bucket", "orca:kv_cache_usage_perc",
            "orca:router_requests_total", "orca:router_upstream_latency_seconds_bucket",
            "orca:router_replicas_ready"} <= metric_names
    assert not [n for n in metric_names if n.endswith("_created")]


def test_dashboard_is_a_grafana_dashboard_on_a_datasource_variable(dashboard) -> None:
    assert dashboard["title"] and dashboard["uid"] and 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "model_name"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == DATASOURCE
    panels = graph_panels(dashboard)
    ids = [p["id"] for p in dashboard["panels"]] + [q["id"] for p in dashboard["panels"] for q in p.get("panels", [])]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == DATASOURCE, p["title"]
            assert t["expr"].strip() and t["refId"], p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_every_query_names_only_exported_metrics(dashboard, metric_names) -> None:
    queries = [(p["title"], e) for p in graph_panels(dashboard) for e in exprs(p)]
    queries += [(f"variable {v['name']}", v["definition"]) for v in dashboard["templating"]["list"]
                if v["type"] == "query"]
    assert queries
    for where, expr in queries:
        names = METRIC.findall(expr)
        assert names, f"{where}: no orca metric in {expr!r}"
        unknown = set(names) - metric_names
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the engine or the router"


def test_required_panels_exist_and_query_their_metrics(dashboard) -> None:
    panels = graph_panels(dashboard)
    for fragment, metrics in REQUIRED.items():
        matching = [p for p in panels if fragment in p["title"].lower()]
        assert matching, f"no panel titled like {fragment!r}"
        used = {m for p in matching for e in exprs(p) for m in METRIC.findall(e)}
        assert metrics <= used, f"{fragment}: {sorted(metrics - used)} not queried"
    # percentiles where the title promises them
    for fragment, qs in (("time to first token", {"0.5", "0.9", "0.99"}),
                         ("inter-token latency", {"0.5", "0.9", "0.99"}),
                         ("end-to-end request latency", {"0.5", "0.99"}),
                         ("router upstream latency p90", {"0.9"})):
        panel = next(p for p in panels if fragment in p["title"].lower())
        got = {m for e in exprs(panel) for m in re.findall(r"histogram_quantile\(\s*([0-9.]+)", e)}
        assert got == qs, (fragment, got)


def test_template_embeds_the_dashboard_for_the_sidecar() -> None:
    text = TEMPLATE.read_text()
    assert text.lstrip().startswith("{{- if .Values.grafanaDashboard.enabled }}")
    assert text.rstrip().endswith("{{- end }}")
    assert '.Files.Get "dashboards/orca.json"' in text
    assert "kind: ConfigMap" in text and "orca.json: |-" in text
    assert ".Values.grafanaDashboard.labels" in text and ".Values.grafanaDashboard.annotations" in text
    values = yaml.safe_load((CHART / "values.yaml").read_text())["grafanaDashboard"]
    assert values == {"enabled": True, "labels": {"grafana_dashboard": "1"}, "annotations": {}}


try:
    import helm_sdkpy as helm
except ImportError:  # the dashboard checks above still run
    helm = None
needs_helm = pytest.mark.skipif(helm is None, reason="installed by `make` (pip --ignore-requires-python helm-sdkpy)")


def lint(chart: Path) -> list[dict]:
    """`helm lint`: renders every template with the chart's values.yaml; the error-level messages."""
    result = asyncio.run(helm.Lint(helm.Configuration(namespace="default")).run(str(chart)))
    return [m for m in result.get("Messages") or [] if m.get("Severity", 0) >= 3] + list(result.get("Errors") or [])


@needs_helm
@pytest.mark.parametrize("overrides", [
    {},
    {"enabled": False},
    {"labels": {"grafana_dashboard": "orca", "team": "ml"}, "annotations": {"grafana_folder": "Orca"}},
], ids=["default", "disabled", "custom-labels-and-folder"])
def test_chart_renders_with_helm(tmp_path, overrides) -> None:
    chart = tmp_path / "orca"
    shutil.copytree(CHART, chart)
    values = yaml.safe_load((chart / "values.yaml").read_text())
    values["grafanaDashboard"].update(overrides)
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    assert not lint(chart)


@needs_helm
def test_lint_catches_a_broken_dashboard_template(tmp_path) -> None:
    """The render check above has teeth: a template error is an error-level lint message."""
    chart = tmp_path / "orca"
    shutil.copytree(CHART, chart)
    broken = chart / "templates/grafana-dashboard.yaml"
    broken.write_text(broken.read_text().replace('.Files.Get "dashboards/orca.json"', ".Files.Get"))
    assert lint(chart)


@needs_helm
@pytest.mark.slow
@pytest.mark.k8s
@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")  # the test cluster's self-signed cert
def test_chart_installs_the_dashboard_configmap(k8s) -> None:
    """A real install (release "dash", its own namespace and ServiceAccount, so nothing collides with
    test_k8s's release "orca" in orca-system: the ClusterRole/Binding are named after the release, and
    Helm skips the CRD in crds/ when it already exists); the ConfigMap is read back."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    ns, name = "orca-dash", "dash"
    api = config.new_client_from_config(str(k8s.kubeconfig()))
    core = client.CoreV1Api(api)
    cfg = helm.Configuration(namespace=ns, kubeconfig=str(k8s.kubeconfig()))
    asyncio.run(helm.Install(cfg).run(name, str(CHART), values={
        "serviceAccount": {"name": "dash-operator"},
        "grafanaDashboard": {"labels": {"grafana_dashboard": "1", "team": "ml"},
                             "annotations": {"grafana_folder": "Orca"}},
    }, create_namespace=True, wait=False))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                cm = core.read_namespaced_config_map("dash-orca-dashboard", ns)
                break
            except ApiException as e:
                if e.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert cm.metadata.labels["grafana_dashboard"] == "1" and cm.metadata.labels["team"] == "ml"
        assert cm.metadata.labels["app.kubernetes.io/instance"] == name
        assert cm.metadata.annotations["grafana_folder"] == "Orca"
        assert json.loads(cm.data["orca.json"]) == json.loads(DASHBOARD.read_text())
    finally:
        asyncio.run(helm.Uninstall(cfg).run(name, wait=False))
        try:
            core.delete_namespace(ns)
        except ApiException:
            pass
