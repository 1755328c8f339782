"""The operator factory: ONE place deciding how a pipeline task runs.

``stage_operator(task_id, batch=..., plate=..., settings=...)`` returns

* mode ``local``: a :class:`LocalStageOperator` that runs ``python -m cpjump1 <args>`` as a
  subprocess of the Airflow worker, in the main environment (the CellProfiler and DeepProfiler
  stages start their own environments from there), streaming every output line into the task
  log;
* mode ``kubernetes``: a ``KubernetesPodOperator`` with the stage image and the same arguments
  (see :mod:`cpjump1.airflow.k8s`), or for the sharded analysis the provider's indexed
  ``KubernetesJobOperator``.

The DAG builder never branches on the mode. Every operator shares :class:`StageMixin`: at run
time it reads the run's ``params`` (stage selection, force, shard count), skips itself when
its stage is not selected, and builds its arguments with :func:`cpjump1.airflow.stages.stage_argv`.

Exit codes: ``cpjump1`` exits 2 on bad input and failed expectations (a
:class:`~cpjump1.errors.Cpjump1Error`), which a retry cannot fix, so the local operator fails
such a task at once (``AirflowFailException``); any other failure is retried with exponential
backoff.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections import deque
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from cpjump1 import deploy
from cpjump1.airflow import stages as st
from cpjump1.settings import Settings, get_settings

#: Retry policy of every stage task (exponential backoff, capped).
RETRIES = 2
RETRY_DELAY = dt.timedelta(seconds=30)
RETRY_BACKOFF = 2.0
MAX_RETRY_DELAY = dt.timedelta(minutes=10)
#: In kubernetes mode: most analysis shard pods of ONE plate at a time (also its pool slots).
ANALYSIS_PARALLELISM = 4
#: Exit code of ``cpjump1`` for bad input / failed validation (see cpjump1.cli.main).
EXIT_BAD_INPUT = 2


def run_params(context: Any) -> dict[str, Any]:
    """The run's params as plain values (form values, conf, or defaults)."""
    params = context.get("params") or {}
    return {k: params[k] for k in params}


class StageMixin:
    """Run-time behaviour shared by the local and the Kubernetes operators."""

    stage_task: st.Task
    batch: str | None
    plate: Any

    def _init_stage(self, task_id: str, batch: str | None, plate: Any) -> None:
        self.stage_task = st.TASKS[task_id]
        self.batch = batch
        self.plate = plate

    def skip_unless_selected(self, params: dict[str, Any]) -> None:
        selected = params.get("stages")
        if self.stage_task.level == "benchmark" or selected is None:
            return
        if self.stage_task.selector not in selected:
            raise AirflowSkipException(
                f"stage {self.stage_task.selector!r} not selected in params.stages={selected}"
            )

    def skip_unless_plates_done(self, context: Any) -> list[str] | None:
        """Batch-level tasks run only when at least one plate finished without failure."""
        if self.stage_task.level != "batch":
            return None
        from cpjump1.airflow.summary import done_plates

        ti = context["ti"]
        plates = ti.xcom_pull(task_ids="plan") or []
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id], task_group_id="plate")
        done = done_plates(list(plates), states.get(ti.run_id, {}))
        if not done:
            raise AirflowSkipException(f"no plate of {self.batch} finished without failure")
        self.log.info("plates done: %s", done)
        return done

    def argv(self, params: dict[str, Any], shard: int | str | None = None, plates: list[str] | None = None) -> list[str]:
        task_id = self.stage_task.task_id
        if task_id == "benchmark":
            settings = get_settings()
            from cpjump1.storage import Layout, join

            name = params.get("name")
            return st.stage_argv(
                "benchmark",
                profiles_root=join(settings.storage_root, "profiles"),
                benchmark_out=Layout(settings.storage_root).benchmark_dir(name) if name else None,
                modality=params.get("modality") or "cellprofiler",
            )
        return st.stage_argv(
            task_id,
            self.batch,
            self.plate if self.stage_task.level == "plate" else None,
            shards=params.get("shards"),
            shard=shard,
            force=bool(params.get("force")),
            checkpoint=params.get("deep_profiles_checkpoint"),
            plates=plates,
            allow_missing_wells=bool(params.get("allow_missing_wells")),
        )

    def shard_count(self, params: dict[str, Any]) -> int:
        """Shards of this plate: the load_data manifest (``shards.json``), else ``params.shards``."""
        from cpjump1 import storage

        settings = get_settings()
        manifest = storage.join(storage.Layout(settings.storage_root).load_data_dir(self.batch, self.plate), "shards.json")
        try:
            return int(json.loads(storage.read_text(manifest, settings))["n_shards"])
        except Exception as exc:  # noqa: BLE001 - fall back to the requested count
            self.log.warning("cannot read %s (%s); using params.shards", manifest, exc)
            return int(params.get("shards") or 1)


class LocalStageOperator(StageMixin, BaseOperator):
    """Run one pipeline task as ``python -m cpjump1 <args>`` on the worker (mode ``local``)."""

    template_fields = ("plate",)
    ui_color = "#dbeafe"

    def __init__(self, *, task_id: str, batch: str | None = None, plate: Any = None, stage_task: str | None = None, **kwargs):
        super().__init__(task_id=task_id, **kwargs)
        self._init_stage(stage_task or task_id, batch, plate)
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> Any:
        params = run_params(context)
        self.skip_unless_selected(params)
        done = self.skip_unless_plates_done(context)
        if self.stage_task.sharded:
            n = self.shard_count(params)
            for shard in range(n):
                self.log.info("shard %d/%d", shard + 1, n)
                self.run_cli(self.argv(params, shard=shard))
            return {"plate": self.plate, "shards": n}
        self.run_cli(self.argv(params, plates=done))
        return None

    def run_cli(self, argv: list[str]) -> None:
        cmd = [sys.executable, "-m", "cpjump1", *argv]
        self.log.info("running: %s", subprocess.list2cmdline(["cpjump1", *argv]))
        tail: deque[str] = deque(maxlen=20)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=env, start_new_session=True,
        )
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            self.log.info("%s", line)
        rc = self._proc.wait()
        self._proc = None
        if rc == 0:
            return
        errors = [ln for ln in tail if ln.startswith("error:")]
        detail = errors[-1] if errors else (tail[-1] if tail else "no output")
        msg = f"cpjump1 {argv[0]} exited with code {rc}: {detail}"
        if rc == EXIT_BAD_INPUT:
            raise AirflowFailException(msg + " (bad input or failed validation: not retried)")
        raise AirflowException(msg)

    def on_kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


def _common_kwargs(task: st.Task) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "retries": 0 if task.validation else RETRIES,
        "retry_delay": RETRY_DELAY,
        "retry_exponential_backoff": RETRY_BACKOFF,
        "max_retry_delay": MAX_RETRY_DELAY,
    }
    pool = deploy.pool(task.deploy_stage)
    if pool:
        kwargs["pool"] = pool
    return kwargs


def stage_operator(
    task_id: str,
    *,
    batch: str | None = None,
    plate: Any = None,
    settings: Settings | None = None,
    **kwargs: Any,
) -> BaseOperator:
    """The operator of one pipeline task for the configured mode (``settings.mode``).

    ``plate`` may be a mapped argument of the per-plate task group; it is resolved per map index.
    Extra ``kwargs`` (trigger_rule, outlets, ...) go to the operator.
    """
    settings = settings or get_settings()
    task = st.TASKS[task_id]
    options = {**_common_kwargs(task), **kwargs}
    if settings.mode == "kubernetes":
        from cpjump1.airflow import k8s

        return k8s.kubernetes_operator(task, batch=batch, plate=plate, settings=settings, **options)
    return LocalStageOperator(task_id=task_id, batch=batch, plate=plate, **options)
