"""The cluster files validate against the schemas that will judge them, before any cluster sees them.

- ``cluster/kuberay/*.yaml``: RayCluster and RayJob against the KubeRay ``ray.io/v1`` CRD schemas
  (``../shared/kuberay-crds/``; skipped when absent), made strict the way ``kubectl apply`` is
  (unknown fields are errors), plus the KubeRay operator's own checks that a CRD schema cannot
  express; the PersistentVolumeClaim as core Kubernetes.
- ``cluster/launcher/aws-gpu.yaml``: against Ray's cluster-launcher schema, through Ray's own
  ``prepare_config`` + ``validate_config``.
- Project conventions: one pinned image and Ray version everywhere, the shared volume mounted by
  every pod, outputs on it.
- Every ``jobs/*.py`` and ``jobs/configs/*.yaml`` the cluster files name exists.

Negative tests show that each validator can fail.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="manifest validation needs jsonschema (pip install -e '.[test]')")

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).parents[1] / ".." / "shared" / "kuberay-crds"
KUBERAY_DIR = REPO_ROOT / "cluster" / "kuberay"
LAUNCHER_CONFIG = REPO_ROOT / "cluster" / "launcher" / "aws-gpu.yaml"
DOCKERFILE = REPO_ROOT / "infra" / "Dockerfile"

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
SHARED_MOUNT = "/mnt/kd-ray"
# From the KubeRay operator (ray-operator/controllers/ray/utils): names become Service names.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, as the Kubernetes API server's strict decoding does
    (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_StrictLoader) if doc is not None]


KUBERAY_DOCS = [
    pytest.param(doc, id=f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}")
    for path in sorted(KUBERAY_DIR.glob("*.yaml"))
    for doc in _documents(path)
]
RAY_DOCS = [p for p in KUBERAY_DOCS if p.values[0].get("kind") in CRD_FILES]


# ------------------------------------------------------------------ CRD schema -> JSON Schema

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def crd_to_json_schema(node: dict) -> dict:
    """Turn a CRD ``openAPIV3Schema`` into a JSON Schema that judges a manifest as the API server does.

    - ``x-kubernetes-int-or-string`` (quantities such as ``cpu: 500m`` or ``nvidia.com/gpu: 1``)
      becomes ``anyOf: [integer, string]`` where the CRD does not already say so; the quantity
      ``pattern`` then applies to strings only, as in Kubernetes.
    - Objects with declared ``properties`` reject unknown fields (``kubectl apply`` defaults to
      strict field validation), unless marked ``x-kubernetes-preserve-unknown-fields``.
    - ``nullable`` allows null; ``format: int32/int64`` bounds integers.
    - Other ``x-kubernetes-*`` keys (list/map types, CEL ``x-kubernetes-validations``) are dropped:
      they concern merges and server-side rules, not the document's shape.
    """
    out = {key: value for key, value in node.items() if not key.startswith("x-kubernetes-")}
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: crd_to_json_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = crd_to_json_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [crd_to_json_schema(sub) for sub in out[key]]

    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("type") == "integer" and out.get("format") in _INT_RANGES:
        low, high = _INT_RANGES[out["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip(
            f"KubeRay CRD schemas not found at {CRD_DIR.resolve()} (expected the shared folder "
            "kuberay-crds/ with ray.io_rayclusters.yaml and ray.io_rayjobs.yaml next to the repo); "
            "RayCluster/RayJob manifests were not validated"
        )
    validators = {}
    for kind, filename in CRD_FILES.items():
        # 1-2 MB each: libyaml's loader, where PyYAML has it, parses them several times faster.
        crd = yaml.load((CRD_DIR / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind, filename
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = crd_to_json_schema(v1["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def schema_errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ------------------------------------------------------------------ KubeRay operator checks


def _cluster_spec(doc: dict) -> dict | None:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return pods


def operator_errors(doc: dict) -> list[str]:
    """Rules the KubeRay operator enforces on admission (ValidateRayClusterSpec/ValidateRayJobSpec)
    that the CRD schema does not express; a manifest breaking them is created but never runs."""
    errors = []
    kind, name = doc["kind"], doc["metadata"].get("name", "")
    if len(name) > MAX_NAME_LENGTH[kind] or not DNS_1035_LABEL.match(name):
        errors.append(f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_NAME_LENGTH[kind]} characters")

    spec = doc["spec"]
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"spec.submissionMode {mode!r}: one of {sorted(SUBMISSION_MODES)}")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.ttlSecondsAfterFinished needs spec.shutdownAfterJobFinishes: true")
        if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
            errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            errors.append("spec.activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit", 0) < 0:
            errors.append("spec.backoffLimit must not be negative")
        if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            errors.append("spec.backoffLimit is incompatible with InteractiveMode")
        if not spec.get("entrypoint"):
            errors.append("spec.entrypoint is empty")
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "")

    cluster = _cluster_spec(doc)
    if cluster is None:
        return errors
    groups = [("headGroupSpec", cluster["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{g['groupName']}]", g) for g in cluster.get("workerGroupSpecs", [])]
    for where, group in groups:
        params = group.get("rayStartParams", {})
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{where}: needs at least one container")
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{where}: resources set both in rayStartParams and in resources")
        if "labels" in params:
            errors.append(f"{where}: rayStartParams['labels'] is not supported; use labels")
    names = [g["groupName"] for g in cluster.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        errors.append(f"workerGroupSpecs: group names must be unique, got {names}")
    for group in cluster.get("workerGroupSpecs", []):
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not low <= group.get("replicas", low) <= high:
            errors.append(f"workerGroupSpecs[{group['groupName']}]: need minReplicas <= replicas <= maxReplicas")
    for where, pod in _pod_specs(cluster):
        for container in pod.get("containers", []):
            requests = container.get("resources", {}).get("requests", {})
            limits = container.get("resources", {}).get("limits", {})
            for resource in set(requests) | set(limits):
                # Extended resources cannot be overcommitted: Kubernetes rejects requests != limits.
                both = resource in requests and resource in limits
                if "/" in resource and both and requests[resource] != limits[resource]:
                    errors.append(f"{where}/{container['name']}: {resource} requests must equal limits")
    return errors


# ------------------------------------------------------------------ KubeRay manifests


def test_every_kuberay_manifest_has_a_validator():
    kinds = {p.values[0].get("kind") for p in KUBERAY_DOCS}
    assert kinds <= {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim"}, f"no validator here for {kinds}"
    assert {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_ray_manifest_matches_crd_schema(doc, crd_validators):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = schema_errors(crd_validators[doc["kind"]], doc)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_ray_manifest_passes_operator_checks(doc):
    errors = operator_errors(doc)
    assert not errors, "\n".join(errors)


def test_pvc_is_read_write_many():
    (pvc,) = [p.values[0] for p in KUBERAY_DOCS if p.values[0]["kind"] == "PersistentVolumeClaim"]
    assert pvc["apiVersion"] == "v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "Ray Train/Tune need storage every node can write"
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)?([KMGTPE]i?)?", str(pvc["spec"]["resources"]["requests"]["storage"]))


def _pinned_image() -> str:
    # The package version (pyproject.toml's [project] version; no tomllib on Python 3.10).
    version = re.search(r'^version\s*=\s*"([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M).group(1)
    return f"ghcr.io/kd-ray/kd-ray:{version}-gpu"


def _dockerfile_ray_version() -> str:
    text = DOCKERFILE.read_text()
    version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", text, re.M), "the base image follows RAY_VERSION"
    return version


@pytest.mark.parametrize("doc", RAY_DOCS)
def test_ray_manifest_follows_project_conventions(doc):
    """One pinned image and Ray version everywhere, the shared volume on every pod, outputs on it."""
    (pvc,) = [p.values[0] for p in KUBERAY_DOCS if p.values[0]["kind"] == "PersistentVolumeClaim"]
    cluster = _cluster_spec(doc)
    assert cluster["rayVersion"] == _dockerfile_ray_version()
    assert cluster.get("enableInTreeAutoscaling") is True
    assert cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    for where, pod in _pod_specs(cluster):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        for container in pod["containers"]:
            assert container["image"] == _pinned_image(), f"{where}: image {container['image']}"
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            claim = claims.get(mounts.get(SHARED_MOUNT))
            assert claim == pvc["metadata"]["name"], f"{where}: {SHARED_MOUNT} is not the shared PVC"
    gpu_limits = [
        container["resources"]["limits"].get("nvidia.com/gpu", 0)
        for group in cluster["workerGroupSpecs"]
        for container in group["template"]["spec"]["containers"]
    ]
    assert any(int(n) > 0 for n in gpu_limits), "a GPU worker group"
    if doc["kind"] == "RayJob":
        argv = shlex.split(doc["spec"]["entrypoint"])
        flag = "--output.path" if "--output.path" in argv else "--output"  # label vs training stages
        assert argv[argv.index(flag) + 1].startswith(SHARED_MOUNT + "/")
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


# ------------------------------------------------------------------ the RayService (kd-ray serve)
#
# No RayService CRD is in ../shared/kuberay-crds/: its rayClusterConfig is a RayCluster spec (checked by the
# RayCluster CRD, the operator's checks and the conventions), its other fields are the few of KubeRay's
# RayServiceSpec listed here, and serveConfigV2 is checked by Ray Serve's own schema and kd-ray's ServeConfig.

RAYSERVICE_SPEC_FIELDS = {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
                          "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds"}
SERVE_APP = "kd_ray.stages.serve:build_app"


def _rayservice() -> dict:
    return copy.deepcopy(next(p.values[0] for p in KUBERAY_DOCS if p.values[0]["kind"] == "RayService"))


def _as_raycluster(service: dict) -> dict:
    return {"apiVersion": service["apiVersion"], "kind": "RayCluster", "metadata": service["metadata"],
            "spec": service["spec"]["rayClusterConfig"]}


def serve_config_errors(service: dict) -> list[str]:
    """serveConfigV2 as Ray Serve reads it (`serve deploy`'s schema), and each kd-ray application's args as
    build_app validates them (kd_ray.config.ServeConfig)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from kd_ray.config import ServeConfig

    errors, config = [], yaml.safe_load(service["spec"]["serveConfigV2"])
    try:
        ServeDeploySchema.parse_obj(config)
    except Exception as e:  # noqa: BLE001  (Ray's pydantic-compat error type)
        errors.append(f"serveConfigV2: {e}")
    for app in config.get("applications", []):
        if app.get("import_path") != SERVE_APP:
            errors.append(f"application {app.get('name')}: import_path {app.get('import_path')!r}, not {SERVE_APP}")
            continue
        try:
            args = ServeConfig.model_validate(app.get("args", {}))
        except ValidationError as e:
            errors.append(f"application {app.get('name')}: args: {e}")
            continue
        if not args.model.startswith(SHARED_MOUNT + "/"):
            errors.append(f"application {app['name']}: model {args.model} is not on the shared volume")
    return errors


def test_the_rayservice_cluster_and_serve_config_validate(crd_validators):
    pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1" and set(service["spec"]) <= RAYSERVICE_SPEC_FIELDS
    cluster = _as_raycluster(service)
    errors = schema_errors(crd_validators["RayCluster"], cluster) + operator_errors(cluster)
    errors += serve_config_errors(service)
    assert not errors, "\n".join(errors)
    spec = cluster["spec"]
    assert spec["rayVersion"] == _dockerfile_ray_version()
    for where, pod in _pod_specs(spec):
        for container in pod["containers"]:
            assert container["image"] == _pinned_image().replace("-gpu", "-cpu"), f"{where}: {container['image']}"
            assert SHARED_MOUNT in {m["mountPath"] for m in container.get("volumeMounts", [])}, where


def test_the_serve_config_check_can_fail():
    pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")
    service = _rayservice()
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["replicas"] = 0
    config["applications"][0]["args"]["modle"] = "typo"
    config["http_options"]["port"] = "eighty"
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    errors = serve_config_errors(service)
    assert any("http_options" in e or "port" in e for e in errors), errors
    assert any("replicas" in e and "modle" in e for e in errors), errors


# ------------------------------------------------------------------ negative tests: validators can fail


def _raycluster() -> dict:
    return copy.deepcopy(next(p.values[0] for p in RAY_DOCS if p.values[0]["kind"] == "RayCluster"))


def test_schema_rejects_wrong_type(crd_validators):
    doc = _raycluster()
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    errors = schema_errors(crd_validators["RayCluster"], doc)
    assert any(e.startswith("spec.workerGroupSpecs.0.maxReplicas:") for e in errors), errors


def test_schema_rejects_unknown_field(crd_validators):
    doc = _raycluster()
    doc["spec"]["enableInTreeAutoscale"] = doc["spec"].pop("enableInTreeAutoscaling")
    errors = schema_errors(crd_validators["RayCluster"], doc)
    assert any("enableInTreeAutoscale" in e and "not allowed" in e for e in errors), errors


@pytest.mark.parametrize(
    ("quantity", "valid"), [("48Gi", True), (48, True), ("500m", True), ("48 GB", False), (4.5, False)]
)
def test_schema_checks_int_or_string_quantities(crd_validators, quantity, valid):
    doc = _raycluster()
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = quantity
    assert (not schema_errors(crd_validators["RayCluster"], doc)) is valid


def test_yaml_loader_rejects_duplicate_keys(tmp_path):
    manifest = tmp_path / "dup.yaml"
    manifest.write_text("spec:\n  backoffLimit: 1\n  backoffLimit: 2\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        _documents(manifest)


def test_operator_checks_reject_ttl_without_shutdown():
    doc = copy.deepcopy(next(p.values[0] for p in RAY_DOCS if p.values[0]["kind"] == "RayJob"))
    doc["spec"]["shutdownAfterJobFinishes"] = False
    doc["metadata"]["name"] = "Kd_Ray"
    errors = operator_errors(doc)
    assert any("shutdownAfterJobFinishes" in e for e in errors) and any("DNS-1035" in e for e in errors), errors


# ------------------------------------------------------------------ Ray cluster launcher


def test_launcher_config_matches_ray_schema():
    from ray import autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    schema = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it, defaults merged
    assert config["docker"]["image"] == _pinned_image()
    assert config["head_node_type"] in config["available_node_types"]


def test_launcher_validation_rejects_wrong_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    config["available_node_types"]["gpu"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError, match="'zero' is not of type 'integer'"):
        validate_config(prepare_config(config))


# ------------------------------------------------------------------ files the cluster files name
#
# EXPECTED TO FAIL until the job entry points and their configs exist: jobs/*.py and
# jobs/configs/*.yaml are written separately from these manifests. A failure names the file
# that a RayJob entrypoint (or a command in a header comment) refers to but the repo lacks.

_JOB_PATH = re.compile(r"\bjobs/(?:configs/)?[\w.-]+\.(?:py|yaml)\b")
REFERENCED_JOB_FILES = sorted(
    {
        match
        for path in sorted((REPO_ROOT / "cluster").rglob("*"))
        if path.is_file() and path.suffix in {".yaml", ".sh"}
        for match in _JOB_PATH.findall(path.read_text())
    }
)


def test_entrypoints_name_job_files():
    entrypoints = [p.values[0]["spec"]["entrypoint"] for p in RAY_DOCS if p.values[0]["kind"] == "RayJob"]
    assert entrypoints and all(_JOB_PATH.search(e) for e in entrypoints), entrypoints
    assert {"jobs/label.py", "jobs/distill.py", "jobs/pipeline.py"} <= set(REFERENCED_JOB_FILES)


@pytest.mark.parametrize("relative_path", REFERENCED_JOB_FILES)
def test_referenced_job_file_exists(relative_path):
    assert (REPO_ROOT / relative_path).is_file(), (
        f"{relative_path} is named by a file under cluster/ but does not exist "
        "(expected until the jobs/ entry points and configs are written)"
    )


@pytest.mark.parametrize("doc", [d for d in RAY_DOCS if d.values[0]["kind"] == "RayJob"])
def test_rayjob_entrypoint_parses_with_its_config(doc, capsys):
    """The entrypoint's config and flag overrides resolve through the real CLI."""
    from kd_ray.cli import main as cli_main

    argv = shlex.split(doc["spec"]["entrypoint"])
    stage = {"pipeline": "run"}.get(Path(argv[1]).stem, Path(argv[1]).stem)  # jobs/<stage>.py
    config = [REPO_ROOT / a if a.endswith(".yaml") else a for a in argv[2:]]
    assert cli_main([stage, *map(str, config), "--print-config"]) == 0
    assert SHARED_MOUNT in capsys.readouterr().out
