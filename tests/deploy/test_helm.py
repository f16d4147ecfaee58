"""The Helm chart renders to valid manifests whose node command the real CLI accepts.

"Valid" is checked against the Kubernetes API's own OpenAPI schemas (kubernetes-validate,
strict: an unknown or misspelt field fails), for the oldest and newest API versions we
support.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from lmcache_mesh.node.sizes import parse_size

from .files import DEPLOY, parse, run_config
from .gotemplate import Renderer

CHART = DEPLOY / "helm" / "lmcache-mesh"
RELEASE = {"Name": "lmcache-mesh", "Namespace": "lmcache", "Service": "Helm"}
KUBERNETES_VERSIONS = ("1.25", "1.35")


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


MESH_SECRET = "lmcache-mesh-secret"


def render(**overrides: Any) -> list[dict[str, Any]]:
    """The chart's manifests for these values (a mesh secret unless they say otherwise)."""
    values = merged(
        yaml.safe_load((CHART / "values.yaml").read_text()), {"meshSecret": MESH_SECRET, **overrides}
    )
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    r = Renderer(
        values,
        RELEASE,
        {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
    )
    r.load_helpers((CHART / "templates" / "_helpers.tpl").read_text())
    docs = []
    for path in sorted((CHART / "templates").glob("*.yaml")):
        for doc in yaml.safe_load_all(r.render(path.read_text())):
            if doc:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: not a manifest"
                assert doc["metadata"]["name"], f"{path.name}: unnamed"
                for version in KUBERNETES_VERSIONS:
                    try:
                        kubernetes_validate.validate(doc, version, strict=True)
                    except kubernetes_validate.ValidationError as exc:
                        raise AssertionError(
                            f"{path.name}: not a valid {doc['kind']} for {version}: {exc}"
                        ) from None
                docs.append(doc)
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def node_image(values: dict[str, Any]) -> str:
    return f"{values['image']['repository']}:{values['image']['tag']}"


def node_argv(script: str, pod: str, zone: str = "zone-a") -> list[str]:
    """The ``lmcache-node`` arguments the container's shell runs, for pod ``pod``."""
    script = script.replace('"$(cat /zone/zone 2>/dev/null | grep . || echo default)"', zone)
    script = script.replace("$POD_NAMESPACE", RELEASE["Namespace"]).replace("$POD_NAME", pod)
    command = script.split("exec ", 1)[1]
    argv = shlex.split(command)
    assert argv[0] == "lmcache-node"
    return argv[1:]


def test_cloud_nodes_are_a_statefulset_with_volumes_seeds_zones_and_scrape_annotations() -> None:
    docs = render()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    sts, svc = one(docs, "StatefulSet"), one(docs, "Service")
    assert {d["kind"] for d in docs} == {
        "StatefulSet",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    }
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9109",
        "prometheus.io/path": "/metrics",
    }
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == values["storage"]["size"]
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (init,) = spec["initContainers"]  # zone from the Kubernetes node's topology label
    assert "topology.kubernetes.io/zone" in str(init["env"]) and spec["serviceAccountName"] == "lmcache-mesh"
    assert init["image"] == node_image(values) and init["command"][:2] == ["python", "-c"]
    compile(init["command"][2], "zone-init", "exec")  # the script is valid Python
    assert spec["enableServiceLinks"] is False  # no LMCACHE_MESH_* look-alikes from Services
    (node,) = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    assert mounts["data"] == "/var/lib/lmcache-mesh" and "zone" in mounts
    for probe in ("readinessProbe", "livenessProbe"):
        assert parse(node[probe]["exec"]["command"][1:]).command == "status"
    configs = {}
    for i in range(values["replicas"]):
        args = parse(node_argv(node["args"][0], f"lmcache-mesh-{i}"))
        assert args.command == "run"
        configs[i] = cfg = run_config(args, env={})
        assert cfg.name == f"lmcache-mesh-{i}" and cfg.mesh.zone == "zone-a"
        storage = cfg.storage
        assert storage.memory_bytes == parse_size(values["memory"])
        assert storage.disk_bytes == parse_size(values["disk"])
        assert cfg.mesh.replicas == values["chunkReplicas"] and cfg.metrics.port == 9109
        assert any(ep.startswith("ipc://") for ep in cfg.listen)
    # every pod's seed is pod 0's advertised address (pod 0 ignores itself as a seed)
    seeds = {seed for cfg in configs.values() for seed in cfg.mesh.join}
    assert seeds == {f"lmcache-mesh-0@{configs[0].mesh.advertise}"}
    assert (
        configs[1].mesh.advertise
        == "tcp://lmcache-mesh-1.lmcache-mesh-headless.lmcache.svc.cluster.local:7700"
    )


def test_the_edge_values_fix_the_zone_and_join_the_cloud_mesh() -> None:
    edge = yaml.safe_load((CHART / "values-edge.yaml").read_text())
    docs = render(**edge)
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service"}  # no node reading: zone is fixed
    spec = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    cfg = run_config(parse(node_argv(spec["containers"][0]["args"][0], "lmcache-mesh-0")), env={})
    assert cfg.mesh.zone == "edge" and cfg.mesh.profile == "wan" and cfg.storage.memory_bytes == 2 << 30
    assert edge["join"][0] in cfg.mesh.join
    # ...as the cloud's own pods name their seed (NAME@ADDR: reachable with CurveZMQ on too)
    cloud = one(render(), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    (cloud_seed,) = run_config(parse(node_argv(cloud["args"][0], "lmcache-mesh-1")), env={}).mesh.join
    assert edge["join"][0] == cloud_seed


def test_a_curve_secret_installs_the_pods_key_and_the_allow_list() -> None:
    docs = render(curveSecret="lmcache-keys")
    spec = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    node = spec["containers"][0]
    script = node["args"][0]
    assert (
        'install -m 600 "/etc/lmcache-mesh/keys/$POD_NAME.key_secret" /var/lib/lmcache-mesh/node.key_secret'
        in script
    )
    assert "/var/lib/lmcache-mesh/authorized_keys" in script
    (keys,) = [v for v in spec["volumes"] if v["name"] == "keys"]
    assert keys["secret"]["secretName"] == "lmcache-keys"
    cfg = run_config(parse(node_argv(script, "lmcache-mesh-2")), env={})
    # the installed files are where a node looks by default: CurveZMQ turns itself on
    assert cfg.key_path == Path("/var/lib/lmcache-mesh/node.key_secret")
    assert cfg.authorized_keys_path == Path("/var/lib/lmcache-mesh/authorized_keys")


def pod_env(node: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The LMCACHE_MESH_* environment of the node container, with Secrets resolved."""
    env = {}
    for var in node["env"]:
        if not var["name"].startswith("LMCACHE_MESH_"):
            continue
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def test_nodes_prove_membership_with_the_mesh_secret_or_are_told_insecure() -> None:
    from lmcache_mesh.engines.cli.daemon import refuse_open_mesh

    from .gotemplate import TemplateError

    node = one(render(), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = pod_env(node, {MESH_SECRET: {"mesh-secret": "0123abcd"}})
    cfg = run_config(parse(node_argv(node["args"][0], "lmcache-mesh-1")), env=env)
    assert cfg.webrtc.mesh_secret == "0123abcd" and not cfg.security.insecure
    refuse_open_mesh(cfg, None)  # the node starts: it listens on 0.0.0.0 and proves membership
    # none of the three: rendering fails (a node would refuse to start), saying what to set
    with pytest.raises(TemplateError, match="set meshSecret"):
        render(meshSecret="")
    node = one(render(meshSecret="", insecure=True), "StatefulSet")["spec"]["template"]["spec"]["containers"][
        0
    ]
    cfg = run_config(parse(node_argv(node["args"][0], "lmcache-mesh-1")), env=pod_env(node, {}))
    assert cfg.security.insecure and not cfg.webrtc.mesh_secret
    refuse_open_mesh(cfg, None)
    with pytest.raises(SystemExit, match="refusing to listen at tcp://0.0.0.0:7700"):
        refuse_open_mesh(
            run_config(parse(node_argv(node["args"][0].replace("--insecure", ""), "x")), env={}), None
        )


def test_a_misspelt_or_mistyped_field_is_not_a_valid_manifest() -> None:
    sts = one(render(), "StatefulSet")
    typo, wrong_type = copy.deepcopy(sts), copy.deepcopy(sts)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    wrong_type["spec"]["replicas"] = "3"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_a_typo_in_a_template_fails_rendering() -> None:
    from .gotemplate import TemplateError

    r = Renderer({"port": 1}, RELEASE, {"Name": "x"})
    with pytest.raises(TemplateError, match="no field 'prot'"):
        r.render("port: {{ .Values.prot }}")
    assert (
        re.sub(
            r"\s+",
            " ",
            r.render("a:\n  {{- if .Values.port }}\n  b: {{ .Values.port | quote }}\n  {{- end }}"),
        )
        == 'a: b: "1"'
    )
