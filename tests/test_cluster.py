"""cluster/: launcher YAML passes Ray's own validation; KubeRay manifests agree with the project; no open ports."""
import re

import pytest
import ray
import yaml
from conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHERS = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RAY_PORTS = {"8265", "10001", "6379"}


def project_ray_version() -> str:
    spec = re.search(r'"ray\[default,tune,train\]==([\d.]+)\.?\*?"', (REPO / "pyproject.toml").read_text()).group(1)
    return spec.rstrip(".")


def test_project_pins_the_installed_ray():
    assert ray.__version__.startswith(project_ray_version())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert config["available_node_types"][config["head_node_type"]]["resources"]["GPU"] == 0
    text = path.read_text()
    assert "mlflow server" in text and "--backend-store-uri" in text and "sqlite" not in text
    assert "BKD_STORAGE_PATH=" in text and ("s3://" in text or "gs://" in text)
    assert "RAY_AUTH_MODE=token" in text


def kuberay_docs():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            yield path, doc


def cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("path, doc", list(kuberay_docs()), ids=lambda v: getattr(v, "name", ""))
def test_kuberay_manifest(path, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert float(head["resources"]["limits"]["cpu"]) >= 2 and "nvidia.com/gpu" not in head["resources"]["limits"]
    for group in spec["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1 and group["minReplicas"] == 0
        assert worker["image"].endswith(f":{ray.__version__}-py311-gpu")
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python -m orchestrator.tune ")
        assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["ttlSecondsAfterFinished"] > 0
        from orchestrator.config.compose import compose
        overrides = doc["spec"]["entrypoint"].split()[3:]
        cfg = compose(overrides)
        assert cfg.pair.teacher == "resnet32x4" and cfg.resources.use_gpu is True


def test_dockerfile_uses_the_project_ray_version():
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in (CLUSTER / "Dockerfile").read_text()


@pytest.mark.parametrize("path", LAUNCHERS + MANIFESTS + [CLUSTER / "Dockerfile"], ids=lambda p: p.name)
def test_no_ray_port_open_to_the_internet(path):
    text = path.read_text()
    assert "0.0.0.0/0" not in text and "::/0" not in text
    assert not re.search(r"dashboard-host[= ]0\.0\.0\.0", text)
    assert "LoadBalancer" not in text and "NodePort" not in text
    data = list(yaml.safe_load_all(text)) if path.suffix == ".yaml" else []
    for doc in data:
        for perm in (doc.get("provider", {}).get("security_group", {}) or {}).get("IpPermissions", []):
            ports = {str(p) for p in range(int(perm["FromPort"]), int(perm["ToPort"]) + 1)}
            assert not ports & RAY_PORTS


@pytest.mark.parametrize("path", LAUNCHERS + MANIFESTS, ids=lambda p: p.name)
def test_no_credentials_in_files(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|password\s*[:=]|BEGIN (RSA )?PRIVATE KEY", text, re.I)
    assert not re.search(r"postgres(ql)?://[^\"'\s]*:[^\"'\s]*@", text)
