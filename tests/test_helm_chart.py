"""The Helm chart (deploy/helm/gpusentry), rendered by a real helm and checked against the Kubernetes schemas.

helm is built from its Go module by scripts/helm.sh (make test does it once); kubernetes-validate carries the
API schemas of each Kubernetes version. Every rendered object must be valid for two versions (strict: an unknown
field is an error), the chart must create no Secret with a value, give the agent exactly its four capabilities,
and produce gpusentry.toml files gpusentry itself accepts. deploy/kubernetes/gpusentry.yaml is the chart rendered
with its defaults, kept current by scripts/render-manifests.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "gpusentry"
MANIFESTS = REPO / "deploy" / "kubernetes" / "gpusentry.yaml"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}  # the Prometheus Operator's: no schema in kubernetes-validate
pytestmark = pytest.mark.deploy


def _helm() -> str | None:
    version = os.environ.get("HELM_VERSION", "v3.22.0")
    built = REPO / "var" / "tools" / f"helm-{version}" / "helm"
    return str(built) if built.exists() else shutil.which("helm")


HELM = _helm()
if HELM is None and os.environ.get("TEST_REQUIRE_HELM"):
    raise RuntimeError("helm is required here (TEST_REQUIRE_HELM) but not built: run scripts/helm.sh")
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm: scripts/helm.sh builds it from its Go module "
                                                     "(make test runs it)")


def render(**values: Any) -> list[dict[str, Any]]:
    assert HELM is not None
    args = [HELM, "template", "gpusentry", str(CHART), "--namespace", "gpusentry", "--kube-version", "1.30.0"]
    overrides = yaml.safe_dump(values) if values else None
    r = subprocess.run(args + (["-f", "-"] if overrides else []), input=overrides, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


EVERYTHING = {
    "namespace": {"create": True},
    "worker": {"autoscaling": {"enabled": True}, "trustedKeys": {"soc-1": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}},
    "serviceMonitor": {"enabled": True},
    "forwarder": {"outputsConfig": '[outputs.syslog]\nenabled = true\nhost = "siem.example.org"\nformat = "cef"\n',
                  "secretEnv": [{"env": "GPUSENTRY_OUTPUTS__SLACK__WEBHOOK_URL", "secret": "gpusentry-slack",
                                 "key": "webhook_url"}]},
}


def pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("DaemonSet", "Deployment", "Job")}


@needs_helm
@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "everything-enabled"])
def test_every_rendered_object_is_valid_for_two_kubernetes_versions(values):
    import kubernetes_validate

    docs = render(**values)
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "ServiceAccount", "DaemonSet", "Deployment", "Job", "Service", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds
    if values:
        assert {"Namespace", "HorizontalPodAutoscaler", "ServiceMonitor", "PodMonitor"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]["selector"]["matchLabels"]
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@needs_helm
def test_the_validation_would_catch_a_broken_object():
    """Not vacuous: a misspelt field or a wrong type in a rendered object fails the schema check."""
    import kubernetes_validate

    daemonset = next(d for d in render() if d["kind"] == "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[0], strict=True)


@needs_helm
def test_least_privilege_no_secret_values_and_no_tokens():
    docs = render(**EVERYTHING)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are referenced, never created with values"
    specs = pods(docs)
    agent = specs["gpusentry-agent"]
    (container,) = agent["containers"]
    sec = container["securityContext"]
    assert sorted(sec["capabilities"]["add"]) == ["DAC_READ_SEARCH", "NET_ADMIN", "NET_RAW", "SYS_PTRACE"]
    assert sec["capabilities"]["drop"] == ["ALL"] and sec["readOnlyRootFilesystem"] and not sec["privileged"]
    assert agent["hostPID"] and agent["hostNetwork"] and agent["runtimeClassName"] == "nvidia"
    assert agent["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    for name, spec in specs.items():
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] and \
                c["securityContext"]["allowPrivilegeEscalation"] is False, name
            for env in c.get("env", []):
                assert "value" not in env or not env["name"].endswith(("PASSWORD", "TOKEN", "URL", "KEY")), env
        if name != "gpusentry-agent":  # the restricted Pod Security profile
            assert spec["securityContext"]["runAsNonRoot"] and \
                spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert all(c["securityContext"]["capabilities"] == {"drop": ["ALL"]} for c in spec["containers"]), name
    for sa in (d for d in docs if d["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    ns = next(d for d in docs if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/warn"] == "restricted"


@needs_helm
def test_network_policies_deny_by_default_and_open_only_kafka_dns_and_outputs():
    policies = {d["metadata"]["name"]: d["spec"] for d in render() if d["kind"] == "NetworkPolicy"}
    assert policies["gpusentry-default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    worker_egress = policies["gpusentry-worker"]["egress"]
    assert [e.get("to") for e in worker_egress] == [None, [{"ipBlock": {"cidr": "10.0.0.0/8"}}]]
    assert {p["port"] for p in worker_egress[0]["ports"]} == {53}
    forwarder_ports = {p["port"] for e in policies["gpusentry-forwarder"]["egress"] for p in e["ports"]}
    assert {443, 6514, 9093} <= forwarder_ports
    assert policies["gpusentry-worker"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "metrics"}]


@needs_helm
def test_every_config_the_chart_writes_is_one_gpusentry_accepts(tmp_path):
    """The ConfigMaps' gpusentry.toml load with gpusentry's own config loader (unknown keys are refused)."""
    from gpusentry.config import load_config

    maps = {d["metadata"]["name"]: d["data"]["gpusentry.toml"] for d in render(**EVERYTHING)
            if d["kind"] == "ConfigMap"}
    assert set(maps) == {"gpusentry-agent", "gpusentry-worker", "gpusentry-forwarder"}
    pod_env = {"GPUSENTRY_KAFKA__SASL_PASSWORD": "from-the-secret"}  # what the pod's env adds
    for name, text in maps.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        cfg = load_config(path, environ=pod_env)
        assert cfg.kafka.sasl_username == name and cfg.kafka.partitions == 24, name
        assert cfg.agent.ignore_process_tree is None, "a monitored node's agent hides no process tree"
    assert "IGNORE_PROCESS_TREE" not in "".join(map(str, render(**EVERYTHING)))
    worker = load_config(tmp_path / "gpusentry-worker.toml", environ=pod_env)
    assert worker.feedback.require_signature and "soc-1" in worker.feedback.trusted_keys
    forwarder = load_config(tmp_path / "gpusentry-forwarder.toml", environ=pod_env)
    assert forwarder.outputs.syslog.enabled and forwarder.outputs.metrics_port == 9466


@needs_helm
def test_the_plain_manifests_are_the_chart_rendered_with_its_defaults():
    r = subprocess.run([str(REPO / "scripts" / "render-manifests.sh"), "--check"], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "HELM": str(HELM)})
    assert r.returncode == 0, r.stderr
    assert [d["kind"] for d in yaml.safe_load_all(MANIFESTS.read_text()) if d][:1] == ["Namespace"]
