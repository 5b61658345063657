"""The compose stack's files agree with each other and with the node (no Docker needed).

Where a Docker CLI with the compose plugin exists, ``docker compose config`` checks the file too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dicomnode import metrics
from dicomnode.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_the_stack_has_its_services_and_every_mounted_file_exists(compose):
    services = compose["services"]
    assert set(services) == {"orthanc", "dicomnode", "ohif", "viewer", "prometheus", "grafana"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
        for dep in service.get("depends_on", []):
            assert dep in services
    build = services["dicomnode"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["dicomnode"]["build"]
    assert (DEPLOY / gpu["context"] / gpu["dockerfile"]).is_file()
    assert "nvidia/cuda" in (DEPLOY / gpu["context"] / gpu["dockerfile"]).read_text().split("FROM ", 1)[1].split()[0]


def test_node_orthanc_and_prometheus_point_at_each_other(compose):
    cfg = load_config(DEPLOY / "compose-node.yaml")  # every key valid, as the node will check it
    orthanc = compose["services"]["orthanc"]["environment"]
    node_service = compose["services"]["dicomnode"]
    ae, host, port = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])["dicomnode"]
    assert (ae, host, port) == (cfg.node.ae_title, "dicomnode", cfg.node.port)
    assert cfg.destinations["pacs"].host == "orthanc" and cfg.destinations["pacs"].ae_title == orthanc["ORTHANC__DICOM_AET"]
    assert any(c.ae_title == orthanc["ORTHANC__DICOM_AET"] for c in cfg.callers)
    assert orthanc["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    lua = (DEPLOY / "orthanc" / "autoroute.lua").read_text()
    assert f"'{cfg.node.ae_title}'" in lua and "SendToModality(instanceId, 'dicomnode')" in lua
    assert cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0"
    assert f"{cfg.metrics.port}:{cfg.metrics.port}" in node_service["ports"]
    assert f"{cfg.metrics.port}/readyz" in " ".join(node_service["healthcheck"]["test"])
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [f"dicomnode:{cfg.metrics.port}"]
    nginx = (DEPLOY / "viewer" / "nginx.conf").read_text()
    assert "proxy_pass http://orthanc:8042/dicom-web/" in nginx and "http://ohif:80/" in nginx
    assert "wadoRoot: '/dicom-web'" in (DEPLOY / "viewer" / "app-config.js").read_text()


def exported_names() -> set[str]:
    names = set()
    for m in vars(metrics._Metrics()).values():
        kind, base = m._type, m._name
        names |= {base + "_total"} if kind == "counter" else {base + s for s in ("_bucket", "_sum", "_count")}
    names |= {"dicomnode_jobs", "dicomnode_outbox_pending", "dicomnode_outbox_oldest_pending_age_seconds",
              "dicomnode_outbox_failed", "dicomnode_studies"}
    return names


def test_the_dashboard_asks_only_for_metrics_the_node_exports():
    dash = json.loads((DEPLOY / "grafana" / "dicomnode.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"dicomnode_[a-z_]+", e)}
    known = exported_names()
    assert used and used <= known, used - known
    # the list: every family shows on the dashboard
    for family in ("instances_received", "received_bytes", "associations", "cstore_failures", "studies_completed",
                   "jobs", "job_queue_wait_seconds", "analysis_seconds", "encode_seconds", "study_to_delivery_seconds",
                   "outbox_pending", "outbox_oldest_pending_age_seconds", "worker_restarts", "model_load_failures"):
        assert any(u.startswith(f"dicomnode_{family}") for u in used), family
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dicomnode.yaml").read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {datasource["datasources"][0]["uid"]}


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
                    reason="no docker compose CLI here")
def test_docker_compose_accepts_the_file():
    r = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_cluster_stack_puts_haproxy_before_two_nodes_on_one_database_and_spool():
    stack = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    services = stack["services"]
    assert set(services) == {"postgres", "orthanc", "node1", "node2", "haproxy"}
    cfg = load_config(DEPLOY / "compose-cluster-node.yaml")  # every key valid, as the node will check it
    pg = services["postgres"]["environment"]
    assert cfg.storage.database == (f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
                                    f"{pg['POSTGRES_DB']}")
    nodes = [services["node1"], services["node2"]]
    for node in nodes:
        mounts = dict(v.split(":")[:2] for v in node["volumes"])
        assert mounts["shared-spool"] == str(cfg.storage.shared_dir)
        assert mounts["./compose-cluster-node.yaml"] == "/etc/dicomnode/node.yaml"
        assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert (DEPLOY / node["build"]["context"] / node["build"]["dockerfile"]).is_file()
        for volume in node["volumes"]:
            source = volume.split(":", 1)[0]
            assert (DEPLOY / source).exists() if source.startswith(".") else source in stack["volumes"]
    own = {v for n in nodes for v in n["volumes"] if v.endswith(":/var/lib/dicomnode")}
    assert own == {"node1-data:/var/lib/dicomnode", "node2-data:/var/lib/dicomnode"}  # each node its own data folder
    assert "postgres" in (DEPLOY / "Dockerfile").read_text().split("pip install", 1)[1].split("\n")[0]
    haproxy = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert "mode tcp" in haproxy and f"bind :{cfg.node.port}" in haproxy
    assert {f"server {n} {n}:{cfg.node.port}" for n in ("node1", "node2")} <= {line.strip().rsplit(" check", 1)[0]
                                                                               for line in haproxy.splitlines()}
    assert f"{cfg.node.port}:{cfg.node.port}" in services["haproxy"]["ports"]
    assert services["haproxy"]["volumes"][0].startswith("./haproxy/haproxy.cfg:")
    ae, host, port = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])["dicomnode"]
    assert (ae, host, port) == (cfg.node.ae_title, "haproxy", cfg.node.port)
    assert cfg.destinations["pacs"].host == "orthanc"
