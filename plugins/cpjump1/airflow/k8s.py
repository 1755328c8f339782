"""Kubernetes mode of the operator factory: stage pods and indexed shard Jobs.

Imported only when ``CPJUMP1_MODE=kubernetes`` (the provider and the Kubernetes client take
seconds to import). Pod settings come from :mod:`cpjump1.deploy`, the module the Helm chart is
tested against, so the pods refer to the chart's ServiceAccount, ConfigMaps, Secret, volumes,
security contexts and GPU toleration by the same names.

Sharding (``analysis``): each plate is ONE Airflow task, a ``KubernetesJobOperator`` with
``completionMode: Indexed`` and ``completions = shards``; Kubernetes runs one pod per shard
(at most :data:`~cpjump1.airflow.factory.ANALYSIS_PARALLELISM` at a time per plate) and passes
the shard index in ``JOB_COMPLETION_INDEX``, which the container args reference as
``$(JOB_COMPLETION_INDEX)``. The task takes that many slots of the ``cpjump1-cellprofiler``
pool, so the pool size caps concurrent shard pods across all plates and DAG runs. Mapping stays
at one map index per plate (51 for the largest batch, far below ``max_map_length`` = 1024),
whatever the shard count. A retried Job reruns every index, and finished shards are skipped by
their completion markers.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

from cpjump1 import deploy
from cpjump1.airflow import stages as st
from cpjump1.airflow.factory import ANALYSIS_PARALLELISM, StageMixin, run_params
from cpjump1.settings import Settings

#: Container args use this for the shard index of an indexed Job (Kubernetes expands $(VAR)).
SHARD_INDEX_ARG = "$(JOB_COMPLETION_INDEX)"
#: Finished Jobs (and their pods) are garbage-collected after this many seconds.
JOB_TTL_SECONDS = 600


_API_CLIENT: list = []


def _model(data: Any, klass: str) -> Any:
    """``kubernetes.client`` model of a camelCase dict (as ``deploy.to_k8s_model``), with ONE
    ``ApiClient`` per process: building one per call costs milliseconds of logging setup, and a
    DAG file builds hundreds of these models."""
    import copy

    from kubernetes.client import ApiClient

    if not _API_CLIENT:
        _API_CLIENT.append(ApiClient())
    return _API_CLIENT[0]._ApiClient__deserialize(copy.deepcopy(data), klass)  # noqa: SLF001


class StagePodOperator(StageMixin, KubernetesPodOperator):
    """A KubernetesPodOperator running ``cpjump1 <args>`` for one task of one plate."""

    template_fields = (*KubernetesPodOperator.template_fields, "plate")

    def __init__(self, *, stage_task: str, batch: str | None = None, plate: Any = None, **kwargs):
        super().__init__(**kwargs)
        self._init_stage(stage_task, batch, plate)

    def prepare(self, context: Any) -> dict[str, Any]:
        params = run_params(context)
        self.skip_unless_selected(params)
        done = self.skip_unless_plates_done(context)
        self.arguments = self.argv(params, shard=SHARD_INDEX_ARG if self.stage_task.sharded else None, plates=done)
        if self.stage_task.level == "plate" and isinstance(self.plate, str):
            self.labels = {**(self.labels or {}), "cpjump1.io/plate": deploy.label_value(self.plate)}
        return params

    def execute(self, context: Any) -> Any:
        self.prepare(context)
        return super().execute(context)


class StageJobOperator(StageMixin, KubernetesJobOperator):
    """An indexed Job running every analysis shard of one plate (one pod per index)."""

    template_fields = (*KubernetesJobOperator.template_fields, "plate")

    def __init__(self, *, stage_task: str, batch: str | None = None, plate: Any = None, **kwargs):
        super().__init__(**kwargs)
        self._init_stage(stage_task, batch, plate)

    prepare = StagePodOperator.prepare

    def execute(self, context: Any) -> Any:
        params = self.prepare(context)
        shards = self.shard_count(params)
        self.completions = shards
        self.parallelism = max(1, min(shards, ANALYSIS_PARALLELISM))
        self.backoff_limit = 2 * shards
        return super().execute(context)


def _shard_env() -> list[dict[str, Any]]:
    # The Job controller sets JOB_COMPLETION_INDEX itself (k8s >= 1.22); declaring it from the
    # annotation keeps the args valid on any cluster and documents where it comes from.
    return [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        }
    ]


_RAW_CACHE: dict[tuple, dict[str, Any]] = {}


def _raw_pod_parts(task: st.Task, settings: Settings) -> dict[str, Any]:
    """Plain-dict pod parts of a task from :mod:`cpjump1.deploy`, computed once per settings
    object and stage (``deploy.volumes`` walks the pipelines and expectations folders)."""
    key = (id(settings), task.deploy_stage, task.sharded)
    if key not in _RAW_CACHE:
        stage = task.deploy_stage
        _RAW_CACHE[key] = {
            "env": deploy.env(stage) + (_shard_env() if task.sharded else []),
            "env_from": deploy.env_from(),
            "resources": deploy.resources(stage, settings),
            "volumes": deploy.volumes(settings),
            "volume_mounts": deploy.volume_mounts(settings),
            "tolerations": deploy.tolerations(stage, settings),
            "node_selector": deploy.node_selector(stage, settings),
            "_settings": settings,  # keeps id(settings) from being reused while cached
        }
    return _RAW_CACHE[key]


def pod_kwargs(task: st.Task, batch: str | None, settings: Settings) -> dict[str, Any]:
    """KubernetesPodOperator arguments of a task, from :mod:`cpjump1.deploy` and the settings."""
    stage = task.deploy_stage
    raw = _raw_pod_parts(task, settings)
    labels = deploy.pod_labels(stage, **({"batch": batch} if batch else {}))
    kwargs: dict[str, Any] = {
        "name": f"cpjump1-{task.task_id.replace('_', '-')}",
        "namespace": settings.namespace,
        "image": deploy.image(stage, settings),
        "image_pull_policy": deploy.image_pull_policy(settings),
        "cmds": ["cpjump1"],
        "env_vars": _model(raw["env"], "list[V1EnvVar]"),
        "env_from": _model(raw["env_from"], "list[V1EnvFromSource]"),
        "container_resources": _model(raw["resources"], "V1ResourceRequirements"),
        "volumes": _model(raw["volumes"], "list[V1Volume]"),
        "volume_mounts": _model(raw["volume_mounts"], "list[V1VolumeMount]"),
        "security_context": deploy.pod_security_context(),
        "container_security_context": deploy.container_security_context(),
        "service_account_name": settings.service_account,
        "automount_service_account_token": False,
        "labels": labels,
        "node_selector": dict(raw["node_selector"]) or None,
        "tolerations": _model(raw["tolerations"], "list[V1Toleration]") or None,
        "get_logs": True,
        "do_xcom_push": False,
        "log_events_on_failure": True,
        "on_finish_action": "delete_pod",
        "startup_timeout_seconds": 600,
    }
    return kwargs


def kubernetes_operator(task: st.Task, *, batch: str | None, plate: Any, settings: Settings, **options: Any):
    """KubernetesPodOperator (or indexed KubernetesJobOperator for sharded tasks) of a task."""
    kwargs = {**pod_kwargs(task, batch, settings), **options}
    # Arguments for the serialized DAG / offline rendering; rebuilt from params at run time.
    if task.level == "benchmark":
        kwargs["arguments"] = ["benchmark"]
    else:
        kwargs["arguments"] = st.stage_argv(
            task.task_id,
            batch,
            plate if isinstance(plate, str) else "{plate}",
            shards=1,
            shard=SHARD_INDEX_ARG if task.sharded else None,
        )
    if task.sharded:
        kwargs.setdefault("pool_slots", ANALYSIS_PARALLELISM)
        return StageJobOperator(
            task_id=task.task_id,
            stage_task=task.task_id,
            batch=batch,
            plate=plate,
            completion_mode="Indexed",
            completions=1,
            parallelism=1,
            backoff_limit=2,
            ttl_seconds_after_finished=JOB_TTL_SECONDS,
            wait_until_job_complete=True,
            job_poll_interval=15,
            on_kill_propagation_policy="Foreground",
            **kwargs,
        )
    return StagePodOperator(task_id=task.task_id, stage_task=task.task_id, batch=batch, plate=plate, **kwargs)
