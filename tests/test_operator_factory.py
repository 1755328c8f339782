"""The operator factory: one place decides local subprocess vs KubernetesPodOperator / Job.

Kubernetes pods are rendered offline (``build_pod_request_obj(dry_run=True)``; the Job with the
hook's in-cluster lookup switched off, see /work/shared/notes/k8s-tooling.md) and validated
strictly against the Kubernetes 1.30 and 1.33 schemas with kubernetes-validate.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("airflow.sdk")

from cpjump1 import deploy  # noqa: E402
from cpjump1.airflow import stages as st  # noqa: E402
from cpjump1.airflow.factory import LocalStageOperator, stage_operator  # noqa: E402

BATCH, PLATE = "2020_11_04_CPJUMP1", "BR00117010"
K8S_VERSIONS = ("1.30.0", "1.33.0")


@pytest.fixture(autouse=True)
def _airflow_home(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


@pytest.fixture
def k8s_settings(settings):
    return settings.model_copy(update={"mode": "kubernetes", "namespace": "cpjump1-test"})


def _render(op):
    """The manifest the operator would send to the API server, as a camelCase dict."""
    from kubernetes.client import ApiClient

    if st.TASKS[op.stage_task.task_id].sharded:
        op.hook._is_in_cluster = False  # cached property; creating the hook does not connect
        obj = op.build_job_request_obj()
    else:
        obj = op.build_pod_request_obj(dry_run=True)
    return ApiClient().sanitize_for_serialization(obj)


def test_stage_argv_table_covers_every_task():
    for task_id, task in st.TASKS.items():
        kwargs = {"shard": 3} if task.sharded else {}
        if task_id == "benchmark":
            argv = st.stage_argv(task_id, profiles_root="/p", modality="cellprofiler")
        else:
            argv = st.stage_argv(task_id, BATCH, PLATE, shards=4, force=True, **kwargs)
        assert argv[0] in {"load-data", "validate", "illum", "analysis", "aggregate", "profiles", "deep-profiles", "benchmark"}
        assert ("--force" in argv) == (task.force and task_id != "benchmark")
    assert st.stage_argv("load_data", BATCH, PLATE, shards=4) == [
        "load-data", "--batch", BATCH, "--plate", PLATE, "--shards", "4"]
    assert st.stage_argv("analysis", BATCH, PLATE, shard="$(JOB_COMPLETION_INDEX)")[-2:] == [
        "--shard", "$(JOB_COMPLETION_INDEX)"]
    assert st.stage_argv("validate_single_cell", BATCH, PLATE)[:3] == ["validate", "--stage", "single_cell"]
    with pytest.raises(ValueError):
        st.stage_argv("analysis", BATCH, PLATE)


def test_stage_argv_matches_the_real_cli_options():
    """Every option the table passes exists on the stage's click command (when the module is there)."""
    import importlib

    import click

    from cpjump1.cli import COMMANDS

    checked = 0
    for task_id, task in st.TASKS.items():
        kwargs = {"shard": 0} if task.sharded else {}
        if task_id == "benchmark":
            argv = st.stage_argv(task_id, profiles_root="/p", benchmark_out="/o", modality="cellprofiler")
        else:
            argv = st.stage_argv(task_id, BATCH, PLATE, shards=2, force=True, checkpoint="/c.h5", **kwargs)
        module, attr = COMMANDS[argv[0]].split(":")
        try:
            cmd = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue  # stage not written yet: tests/test_dags.py runs the stages for real
        opts = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
        for token in argv[1:]:
            if token.startswith("--"):
                assert token in opts, f"{task_id}: cpjump1 {argv[0]} has no option {token}"
        checked += 1
    assert checked >= 3


def test_local_mode_builds_local_operators(settings):
    for task in (*st.PLATE_TASKS, st.FEATURE_SELECT_BATCH):
        op = stage_operator(task.task_id, batch=BATCH, plate=PLATE, settings=settings)
        assert isinstance(op, LocalStageOperator)
        assert op.retries == (0 if task.validation else 2)
        assert op.retry_exponential_backoff
        assert op.pool == (deploy.pool(task.deploy_stage) or "default_pool")


def test_local_operator_streams_output_and_classifies_exit_codes(settings, capfd):
    from airflow.sdk.exceptions import AirflowFailException

    op = LocalStageOperator(task_id="load_data", batch=BATCH, plate=PLATE)
    op.run_cli(["catalog", "--batch", BATCH])
    out, err = capfd.readouterr()
    assert "U2OS 48-hour Compound Plate 3" in out + err  # the CLI's output reached the task log
    with pytest.raises(AirflowFailException, match="unknown batch"):
        op.run_cli(["catalog", "--batch", "no_such_batch"])  # exit 2: bad input, not retried


def test_local_operator_skips_unselected_stage(settings):
    from airflow.sdk.exceptions import AirflowSkipException

    op = LocalStageOperator(task_id="illum", batch=BATCH, plate=PLATE)
    with pytest.raises(AirflowSkipException):
        op.execute({"params": {"stages": ["load_data"], "shards": 1, "force": False}})


@pytest.mark.parametrize("task_id", [t.task_id for t in (*st.PLATE_TASKS, st.FEATURE_SELECT_BATCH, st.BENCHMARK)])
def test_kubernetes_pod_renders_and_validates(k8s_settings, task_id):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    task = st.TASKS[task_id]
    op = stage_operator(
        task_id, batch=None if task.level == "benchmark" else BATCH, plate=PLATE, settings=k8s_settings
    )
    manifest = _render(op)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)

    pod = manifest["spec"]["template"] if manifest["kind"] == "Job" else manifest
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["image"] == deploy.image(task.deploy_stage, k8s_settings)
    assert container["command"] == ["cpjump1"]
    assert spec["serviceAccountName"] == deploy.SERVICE_ACCOUNT == k8s_settings.service_account
    assert manifest["metadata"]["namespace"] == "cpjump1-test"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"] == deploy.resources(task.deploy_stage, k8s_settings)
    assert {v["name"] for v in spec["volumes"]} >= {deploy.SCRATCH_VOLUME, "pipelines", "expectations"}
    assert {"configMapRef": {"name": deploy.SETTINGS_CONFIGMAP}} in container["envFrom"]
    assert op.on_finish_action.value == "delete_pod"
    assert op.retries == (0 if task.validation else 2) and op.retry_exponential_backoff
    if task.deploy_stage == "deep_profiles":
        assert deploy.GPU_TOLERATION in spec["tolerations"]
        assert container["resources"]["limits"][deploy.GPU_RESOURCE] == "1"
    if task.level == "plate":
        assert PLATE in container["args"] and BATCH in container["args"]
    if task.sharded:
        assert manifest["spec"]["completionMode"] == "Indexed"
        assert manifest["spec"]["ttlSecondsAfterFinished"] > 0
        assert container["args"][-2:] == ["--shard", "$(JOB_COMPLETION_INDEX)"]
        assert any(e["name"] == "JOB_COMPLETION_INDEX" for e in container["env"])
        assert op.pool == deploy.CELLPROFILER_POOL and op.pool_slots >= 1


def test_kubernetes_job_takes_shard_count_at_run_time(k8s_settings, monkeypatch):
    """completions/parallelism come from the run (manifest or params), capped per plate."""
    from cpjump1.airflow.factory import ANALYSIS_PARALLELISM

    op = stage_operator("analysis", batch=BATCH, plate=PLATE, settings=k8s_settings)
    captured = {}

    def fake_execute(self, context):  # stands in for the API calls only
        captured.update(completions=self.completions, parallelism=self.parallelism, args=self.arguments)

    monkeypatch.setattr("airflow.providers.cncf.kubernetes.operators.job.KubernetesJobOperator.execute", fake_execute)
    monkeypatch.setenv("CPJUMP1_STORAGE_ROOT", k8s_settings.storage_root)
    op.execute({"params": {"stages": ["analysis"], "shards": 12, "force": True}})
    assert captured["completions"] == 12
    assert captured["parallelism"] == min(12, ANALYSIS_PARALLELISM)
    assert captured["args"][-1] == "--force"


def test_kubernetes_dags_parse_with_pod_operators(tmp_path, monkeypatch):
    """In kubernetes mode every stage task of every DAG is a pod or job operator."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from cpjump1.airflow.builder import build_all
    from cpjump1.settings import get_settings

    monkeypatch.setenv("CPJUMP1_MODE", "kubernetes")
    dags = build_all(get_settings())
    for dag in dags.values():
        for task in dag.tasks:
            if task.task_id.split(".")[-1] in st.TASKS:
                assert isinstance(task, KubernetesPodOperator), task.task_id
    assert os.environ["CPJUMP1_MODE"] == "kubernetes"


def test_shard_count_comes_from_the_load_data_manifest(settings, monkeypatch):
    """The analysis task runs as many shards as load_data wrote (shards.json), else params.shards."""
    import json as _json
    from pathlib import Path

    from cpjump1.storage import Layout

    monkeypatch.setenv("CPJUMP1_STORAGE_ROOT", settings.storage_root)
    op = LocalStageOperator(task_id="analysis", batch=BATCH, plate=PLATE)
    assert op.shard_count({"shards": 5}) == 5  # no manifest yet
    folder = Path(Layout(settings.storage_root).load_data_dir(BATCH, PLATE))
    folder.mkdir(parents=True)
    (folder / "shards.json").write_text(_json.dumps({"n_shards": 3, "shards": []}))
    assert op.shard_count({"shards": 5}) == 3
    calls = []
    monkeypatch.setattr(LocalStageOperator, "run_cli", lambda self, argv: calls.append(argv))
    result = op.execute({"params": {"stages": ["analysis"], "shards": 5, "force": False}})
    assert result == {"plate": PLATE, "shards": 3}
    assert [c[-1] for c in calls] == ["0", "1", "2"] and all(c[0] == "analysis" for c in calls)
