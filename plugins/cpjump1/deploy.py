"""Names and pod settings shared by the Helm chart (``helm/cpjump1``) and the DAGs' stage pods.

This module is the single source of the names the chart creates and the pod specs refer to:
the stage ServiceAccount, the ConfigMaps that carry ``pipelines/`` and ``expectations/``, the
S3 Secret, the settings ConfigMap, volumes and mount paths, security contexts, labels, the GPU
resource and toleration, and the Airflow pools. ``tests/test_helm.py`` renders the chart and
asserts that every name here equals the rendered one, so a rename has to happen in both places.

Everything is a plain constant or a function returning plain ``dict``/``list`` values in the
Kubernetes API's camelCase form (the form of ``kubectl get -o yaml``). The Airflow operator
factory turns them into ``kubernetes.client`` models for ``KubernetesPodOperator`` /
``KubernetesJobOperator`` (see :func:`to_k8s_model`), or passes :func:`stage_pod` as a full pod
spec. No function here imports Airflow or the Kubernetes client at module import time, so DAG
files stay fast to parse.

Security posture follows the Kubernetes Pod Security Standards, "restricted" profile
(https://kubernetes.io/docs/concepts/security/pod-security-standards/): non-root UID, no
privilege escalation, all capabilities dropped, seccomp ``RuntimeDefault``; in addition the root
file system is read-only and every writable path is an ``emptyDir``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cpjump1.settings import Settings

# --------------------------------------------------------------------------------------------
# Chart-wide names
# --------------------------------------------------------------------------------------------

#: Helm chart name and the value of ``app.kubernetes.io/part-of`` on everything it deploys.
CHART_NAME = "cpjump1"
#: Stages run as this ServiceAccount (IRSA annotation / workload identity goes on it).
#: Equals ``Settings.service_account``.
SERVICE_ACCOUNT = "cpjump1-stage-runner"
#: Role and RoleBinding that let Airflow's scheduler/worker/triggerer launch stage pods/jobs.
LAUNCHER_ROLE = "cpjump1-pod-launcher"
#: ConfigMap with ``CPJUMP1_*`` settings (storage root, S3 options, images, resources).
SETTINGS_CONFIGMAP = "cpjump1-settings"
#: ConfigMap holding the files of ``pipelines/`` (CellProfiler pipelines, configs).
PIPELINES_CONFIGMAP = "cpjump1-pipelines"
#: ConfigMap holding the Great Expectations suites of ``expectations/``.
EXPECTATIONS_CONFIGMAP = "cpjump1-expectations"
#: Where the two ConfigMaps are mounted in stage pods (read-only).
PIPELINES_MOUNT_PATH = "/etc/cpjump1/pipelines"
EXPECTATIONS_MOUNT_PATH = "/etc/cpjump1/expectations"
#: Secret with static S3 credentials (optional: with IRSA / workload identity there is none).
S3_SECRET_NAME = "cpjump1-s3"
#: Its single key: a file in the AWS shared-credentials format (``[default]``,
#: ``aws_access_key_id = ...``, ``aws_secret_access_key = ...``). Mounted as a file rather
#: than exposed as environment variables, so it never shows in ``kubectl describe`` or logs.
S3_SECRET_KEY = "credentials"
S3_SECRET_VOLUME = "s3-credentials"
S3_SECRET_MOUNT_PATH = "/etc/cpjump1/s3"
#: botocore (and so s3fs) reads the credentials file named here.
S3_CREDENTIALS_FILE = f"{S3_SECRET_MOUNT_PATH}/{S3_SECRET_KEY}"
#: Default ``imagePullPolicy`` of stage containers. Stage images are referenced by release tag
#: or, in production, by digest (chart value ``image.digests``), so a node pulls each image
#: once; ``Always`` would add a registry round trip for every one of the hundreds of shard pods
#: of a plate. The chart's ``image.pullPolicy`` (``CPJUMP1_IMAGE_PULL_POLICY``) overrides it.
IMAGE_PULL_POLICY = "IfNotPresent"
#: Optional PersistentVolumeClaim used as storage root instead of S3 (``storage.pvc``).
DATA_PVC = "cpjump1-data"
DATA_VOLUME = "data"
DATA_MOUNT_PATH = "/data"
#: The NetworkPolicy that confines stage pods (ingress denied, egress DNS + HTTPS).
NETWORK_POLICY = "cpjump1-stages"

# --------------------------------------------------------------------------------------------
# Writable scratch (the root file system is read-only)
# --------------------------------------------------------------------------------------------

#: emptyDir for the stage's working files; ``HOME`` and ``TMPDIR`` point here.
SCRATCH_VOLUME = "scratch"
SCRATCH_MOUNT_PATH = "/scratch"
#: Default size limit of the scratch emptyDir (a CellProfiler shard holds a few GiB at most).
SCRATCH_SIZE_LIMIT = "20Gi"
#: A second emptyDir at ``/tmp`` for tools that ignore ``TMPDIR`` (the JVM's hsperfdata).
TMP_VOLUME = "tmp"
TMP_MOUNT_PATH = "/tmp"
TMP_SIZE_LIMIT = "1Gi"

# --------------------------------------------------------------------------------------------
# Identity and security contexts
# --------------------------------------------------------------------------------------------

#: UID/GID of the ``cpjump1`` user baked into every stage image (images/*/Dockerfile).
RUN_AS_USER = 10001
RUN_AS_GROUP = 10001
FS_GROUP = 10001

#: Labels every stage pod carries; the chart's NetworkPolicy selects pods by these.
POD_SELECTOR_LABELS: dict[str, str] = {
    "app.kubernetes.io/part-of": CHART_NAME,
    "app.kubernetes.io/component": "stage",
}
#: Label holding the stage name.
STAGE_LABEL = "cpjump1.io/stage"

# --------------------------------------------------------------------------------------------
# Stages: images, pools, GPU
# --------------------------------------------------------------------------------------------

#: Every stage the DAGs run as a pod (keys of ``Settings.resources``).
STAGES: tuple[str, ...] = (
    "load_data",
    "validate",
    "illum",
    "analysis",
    "aggregate",
    "profiles",
    "deep_profiles",
    "benchmark",
)

#: Stage -> key of ``Settings.images`` (which image runs the stage's ``cpjump1`` command).
STAGE_IMAGES: dict[str, str] = {
    "load_data": "profiling",
    "validate": "profiling",
    "illum": "cellprofiler",
    "analysis": "cellprofiler",
    "aggregate": "profiling",
    "profiles": "profiling",
    "deep_profiles": "deepprofiler",
    "benchmark": "profiling",
}

#: Extended resource name of NVIDIA GPUs (NVIDIA device plugin / GPU operator).
GPU_RESOURCE = "nvidia.com/gpu"
#: Taint key GPU node pools carry (EKS/GKE GPU node groups taint ``nvidia.com/gpu``).
GPU_TOLERATION: dict[str, str] = {
    "key": "nvidia.com/gpu",
    "operator": "Exists",
    "effect": "NoSchedule",
}
#: Stages that ask for a GPU when ``Settings.resources[stage]["gpu"]`` is set.
GPU_STAGES: frozenset[str] = frozenset({"deep_profiles"})

#: Airflow pool that bounds how many CellProfiler shard pods run at once (cluster-wide).
CELLPROFILER_POOL = "cpjump1-cellprofiler"
#: Airflow pool that bounds concurrent GPU pods (one slot per GPU you want to use).
GPU_POOL = "cpjump1-gpu"
#: Default slot counts; the chart's ``pools`` values override them (``airflow pools import``).
DEFAULT_POOL_SLOTS: dict[str, int] = {CELLPROFILER_POOL: 16, GPU_POOL: 1}
_STAGE_POOLS: dict[str, str] = {
    "illum": CELLPROFILER_POOL,
    "analysis": CELLPROFILER_POOL,
    "deep_profiles": GPU_POOL,
}

#: Resources of the KubernetesPodOperator xcom sidecar (only there with ``do_xcom_push=True``).
XCOM_SIDECAR_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "10m", "memory": "16Mi"},
    "limits": {"cpu": "100m", "memory": "64Mi"},
}

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]+")
_CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


# --------------------------------------------------------------------------------------------
# Functions returning plain dicts
# --------------------------------------------------------------------------------------------


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        from cpjump1.errors import UnknownNameError

        raise UnknownNameError(f"unknown stage {stage!r}; known stages: {', '.join(STAGES)}")


def pod_security_context() -> dict[str, Any]:
    """Pod-level ``securityContext``: non-root UID 10001, fsGroup, seccomp RuntimeDefault."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_GROUP,
        "fsGroup": FS_GROUP,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Container ``securityContext``: read-only root, no escalation, every capability dropped."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_GROUP,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def configmap_key(relative_path: str) -> str:
    """ConfigMap key of a file at ``relative_path`` inside ``pipelines/`` or ``expectations/``.

    ConfigMap keys cannot hold ``/``; a file in a sub-folder is stored under the key with
    ``/`` replaced by ``__`` and put back in its folder by the volume's ``items`` (see
    :func:`configmap_items`). The chart's templates apply the same rule.
    """
    key = relative_path.replace("\\", "/").replace("/", "__")
    if not _CONFIGMAP_KEY.match(key) or len(key) > 253:
        from cpjump1.errors import InputDataError

        raise InputDataError(
            f"file {relative_path!r} cannot be stored in a ConfigMap: its name may only use "
            "letters, digits, '-', '_' and '.' (at most 253 characters)"
        )
    return key


def configmap_items(folder: str | Path) -> list[dict[str, str]]:
    """``items`` (key -> path) restoring the folder tree of ``folder`` inside the mount.

    Hidden files and ``__pycache__`` are skipped, as in the chart (``.helmignore``).
    """
    root = Path(folder)
    items = []
    if not root.is_dir():
        return items
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        rel_posix = rel.as_posix()
        items.append({"key": configmap_key(rel_posix), "path": rel_posix})
    return items


def volumes(
    settings: Settings | None = None,
    *,
    pvc: bool | None = None,
    pipelines_items: list[dict[str, str]] | None = None,
    expectations_items: list[dict[str, str]] | None = None,
    scratch_size_limit: str = SCRATCH_SIZE_LIMIT,
) -> list[dict[str, Any]]:
    """Pod ``volumes``: scratch and tmp emptyDirs, the two ConfigMaps, the S3 Secret
    (``optional``: absent under IRSA) and, with ``pvc``, the data PVC.

    Unless given, the ConfigMap ``items`` are :func:`configmap_items` of
    ``settings.pipelines_dir`` / ``settings.expectations_dir`` (``get_settings()`` when no
    settings are passed): the same files the chart was rendered from when images and chart come
    from one commit, so sub-folders such as ``pipelines/deepprofiler/`` keep their place. With
    ``[]`` every key lands in the mount's top folder. ``pvc`` defaults to ``settings.storage_pvc`` when the settings have that field
    (``CPJUMP1_STORAGE_PVC`` of the chart's settings ConfigMap).
    """
    if settings is None and (pipelines_items is None or expectations_items is None):
        from cpjump1.settings import get_settings

        settings = get_settings()
    if settings is not None:
        if pipelines_items is None:
            pipelines_items = configmap_items(settings.pipelines_dir)
        if expectations_items is None:
            expectations_items = configmap_items(settings.expectations_dir)
    if pvc is None:
        pvc = bool(getattr(settings, "storage_pvc", False))
    pipelines: dict[str, Any] = {"name": PIPELINES_CONFIGMAP, "defaultMode": 0o444}
    expectations: dict[str, Any] = {"name": EXPECTATIONS_CONFIGMAP, "defaultMode": 0o444}
    if pipelines_items:
        pipelines["items"] = copy.deepcopy(pipelines_items)
    if expectations_items:
        expectations["items"] = copy.deepcopy(expectations_items)
    out: list[dict[str, Any]] = [
        {"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": scratch_size_limit}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
        {"name": "pipelines", "configMap": pipelines},
        {"name": "expectations", "configMap": expectations},
        {
            "name": S3_SECRET_VOLUME,
            "secret": {"secretName": S3_SECRET_NAME, "optional": True, "defaultMode": 0o440},
        },
    ]
    if pvc:
        out.append({"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": DATA_PVC}})
    return out


def volume_mounts(settings: Settings | None = None, *, pvc: bool | None = None) -> list[dict[str, Any]]:
    """Container ``volumeMounts`` matching :func:`volumes`."""
    if pvc is None:
        pvc = bool(getattr(settings, "storage_pvc", False))
    out: list[dict[str, Any]] = [
        {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_MOUNT_PATH},
        {"name": TMP_VOLUME, "mountPath": TMP_MOUNT_PATH},
        {"name": "pipelines", "mountPath": PIPELINES_MOUNT_PATH, "readOnly": True},
        {"name": "expectations", "mountPath": EXPECTATIONS_MOUNT_PATH, "readOnly": True},
        {"name": S3_SECRET_VOLUME, "mountPath": S3_SECRET_MOUNT_PATH, "readOnly": True},
    ]
    if pvc:
        out.append({"name": DATA_VOLUME, "mountPath": DATA_MOUNT_PATH})
    return out


def env_from() -> list[dict[str, Any]]:
    """``envFrom``: the settings ConfigMap (``CPJUMP1_*``) the chart renders."""
    return [{"configMapRef": {"name": SETTINGS_CONFIGMAP}}]


def env(stage: str | None = None) -> list[dict[str, str]]:
    """Container ``env``: folders of the mounted ConfigMaps and writable HOME/TMPDIR.

    Explicit ``env`` wins over ``envFrom``, so these hold whatever the settings ConfigMap says.
    """
    out = [
        {"name": "CPJUMP1_MODE", "value": "kubernetes"},
        {"name": "CPJUMP1_PIPELINES_DIR", "value": PIPELINES_MOUNT_PATH},
        {"name": "CPJUMP1_EXPECTATIONS_DIR", "value": EXPECTATIONS_MOUNT_PATH},
        {"name": "HOME", "value": SCRATCH_MOUNT_PATH},
        {"name": "TMPDIR", "value": SCRATCH_MOUNT_PATH},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH_MOUNT_PATH}/.matplotlib"},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_MOUNT_PATH}/.cache"},
        {"name": "AWS_SHARED_CREDENTIALS_FILE", "value": S3_CREDENTIALS_FILE},
    ]
    if stage is not None:
        _check_stage(stage)
        out.append({"name": "CPJUMP1_STAGE", "value": stage})
    return out


def resources(stage: str, settings: Settings | None = None) -> dict[str, dict[str, str]]:
    """``resources`` of a stage container from ``Settings.resources[stage]``.

    Keys of the settings entry: ``cpu``, ``memory`` (requests; also the limits unless
    ``cpu_limit`` / ``memory_limit`` are given), ``gpu`` (count of :data:`GPU_RESOURCE`,
    requested and limited alike as Kubernetes requires for extended resources) and
    ``ephemeral_storage``.
    """
    _check_stage(stage)
    if settings is None:
        from cpjump1.settings import DEFAULT_RESOURCES

        spec = dict(DEFAULT_RESOURCES.get(stage, {}))
    else:
        spec = dict(settings.resources.get(stage, {}))
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.get("cpu"):
        requests["cpu"] = str(spec["cpu"])
        limits["cpu"] = str(spec.get("cpu_limit") or spec["cpu"])
    if spec.get("memory"):
        requests["memory"] = str(spec["memory"])
        limits["memory"] = str(spec.get("memory_limit") or spec["memory"])
    if spec.get("ephemeral_storage"):
        requests["ephemeral-storage"] = str(spec["ephemeral_storage"])
        limits["ephemeral-storage"] = str(spec["ephemeral_storage"])
    gpu = str(spec.get("gpu") or "").strip()
    if gpu and gpu != "0":
        requests[GPU_RESOURCE] = gpu
        limits[GPU_RESOURCE] = gpu
    return {"requests": requests, "limits": limits}


def uses_gpu(stage: str, settings: Settings | None = None) -> bool:
    """Whether the stage's pod asks for a GPU."""
    return GPU_RESOURCE in resources(stage, settings)["limits"]


def _scheduling(stage: str, settings: Settings | None) -> dict[str, Any]:
    # ``Settings.scheduling`` (fed by CPJUMP1_SCHEDULING from the settings ConfigMap) is
    # optional: older settings objects have no such field.
    table = getattr(settings, "scheduling", None) or {}
    return dict(table.get(stage, {}) or {})


def node_selector(stage: str, settings: Settings | None = None) -> dict[str, str]:
    """``nodeSelector`` of a stage (chart value ``stages.<stage>.nodeSelector``)."""
    _check_stage(stage)
    return dict(_scheduling(stage, settings).get("nodeSelector", {}) or {})


def tolerations(stage: str, settings: Settings | None = None) -> list[dict[str, Any]]:
    """``tolerations`` of a stage; GPU pods always tolerate the ``nvidia.com/gpu`` taint."""
    _check_stage(stage)
    out = [dict(t) for t in (_scheduling(stage, settings).get("tolerations") or [])]
    if uses_gpu(stage, settings) and not any(t.get("key") == GPU_TOLERATION["key"] for t in out):
        out.append(dict(GPU_TOLERATION))
    return out


def pool(stage: str) -> str | None:
    """Airflow pool a stage's tasks run in (CellProfiler shards, GPU), or ``None``."""
    _check_stage(stage)
    return _STAGE_POOLS.get(stage)


def label_value(value: str) -> str:
    """A Kubernetes label value from any string (63 chars, alphanumeric at both ends)."""
    cleaned = _LABEL_VALUE.sub("-", str(value))[:63].strip("-_.")
    return cleaned


def pod_labels(stage: str, **extra: str) -> dict[str, str]:
    """Labels of a stage pod: the NetworkPolicy selector, the stage, and ``extra`` (batch, plate).

    ``extra`` keys are prefixed with ``cpjump1.io/`` and values sanitised to label syntax.
    """
    _check_stage(stage)
    labels = {
        "app.kubernetes.io/name": CHART_NAME,
        **POD_SELECTOR_LABELS,
        STAGE_LABEL: label_value(stage),
    }
    for key, value in extra.items():
        if value is not None:
            labels[f"cpjump1.io/{key.replace('_', '-')}"] = label_value(value)
    return labels


def image_pull_policy(settings: Settings | None = None) -> str:
    """``imagePullPolicy`` of stage containers: ``settings.image_pull_policy`` when the settings
    have that field (fed by ``CPJUMP1_IMAGE_PULL_POLICY``), else :data:`IMAGE_PULL_POLICY`."""
    return getattr(settings, "image_pull_policy", None) or IMAGE_PULL_POLICY


def image(stage: str, settings: Settings) -> str:
    """Image reference of the stage (``Settings.image`` of :data:`STAGE_IMAGES`)."""
    _check_stage(stage)
    return settings.image(STAGE_IMAGES[stage])


def stage_pod(
    stage: str,
    arguments: list[str],
    settings: Settings,
    *,
    name: str | None = None,
    pvc: bool | None = None,
    labels: dict[str, str] | None = None,
    pipelines_items: list[dict[str, str]] | None = None,
    expectations_items: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A complete ``v1/Pod`` manifest running ``cpjump1 <arguments>`` for ``stage``.

    This is what the operator factory's pod must look like; it can pass the dict to
    ``KubernetesPodOperator(full_pod_spec=to_k8s_model(pod, "V1Pod"))`` or take its parts.
    """
    _check_stage(stage)
    pod_name = label_value(name or f"cpjump1-{stage.replace('_', '-')}").lower()
    container = {
        "name": "base",  # KubernetesPodOperator looks for the container named "base"
        "image": image(stage, settings),
        "imagePullPolicy": image_pull_policy(settings),
        "command": ["cpjump1"],
        "args": list(arguments),
        "env": env(stage),
        "envFrom": env_from(),
        "resources": resources(stage, settings),
        "securityContext": container_security_context(),
        "volumeMounts": volume_mounts(settings, pvc=pvc),
    }
    spec: dict[str, Any] = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes(
            settings,
            pvc=pvc,
            pipelines_items=pipelines_items,
            expectations_items=expectations_items,
        ),
    }
    if selector := node_selector(stage, settings):
        spec["nodeSelector"] = selector
    if tols := tolerations(stage, settings):
        spec["tolerations"] = tols
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": settings.namespace,
            "labels": {**pod_labels(stage), **(labels or {})},
        },
        "spec": spec,
    }


def xcom_sidecar_connection_extra(image_ref: str) -> dict[str, str]:
    """``extra`` of the ``kubernetes_default`` connection for a restricted xcom sidecar.

    The cncf.kubernetes provider reads the sidecar image, resources and security context from
    the connection (JSON strings); without them the sidecar runs as root without limits.
    """
    import json

    return {
        "xcom_sidecar_container_image": image_ref,
        "xcom_sidecar_container_resources": json.dumps(XCOM_SIDECAR_RESOURCES),
        "xcom_sidecar_container_security_context": json.dumps(container_security_context()),
    }


def to_k8s_model(data: dict[str, Any] | list[Any], klass: str) -> Any:
    """Turn a camelCase dict from this module into a ``kubernetes.client`` model (e.g. ``V1Pod``).

    ``klass`` is the model name as the client spells it: ``"V1Pod"``, ``"list[V1Volume]"``,
    ``"V1ResourceRequirements"``... Imports the Kubernetes client lazily.
    """
    from kubernetes.client import ApiClient

    client = ApiClient()
    return client._ApiClient__deserialize(copy.deepcopy(data), klass)  # noqa: SLF001
