"""An embedded Airflow for tests and documentation: api-server, scheduler and DAG processor on
loopback with this checkout's ``dags/``, a SQLite metadata DB and the LocalExecutor, plus a
minimal REST client (standard library only).

Used by ``tests/test_airflow_api.py`` and :mod:`cpjump1.airflow.screenshots`. Authentication is
the simple auth manager with ``all_admins`` (no password), so bind it to 127.0.0.1 only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from cpjump1 import deploy
from cpjump1.settings import repo_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedAirflow:
    """A running Airflow under ``root`` (AIRFLOW_HOME ``root/home``, storage root ``root/data``)."""

    def __init__(self, root: str | os.PathLike, port: int | None = None, parallelism: int = 4):
        self.root = Path(root)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.storage_root = str(self.root / "data")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CPJUMP1_", "AIRFLOW"))}
        self.env.update({
            "AIRFLOW_HOME": str(self.root / "home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(repo_root() / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            "AIRFLOW__API__BASE_URL": self.base,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.root / "logs"),
            # a busy shared machine answers slowly; the default 5 s fails tasks before they start
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
            # the scheduler's log server (it serves task logs to the api-server): a free port,
            # so that several embedded instances can run side by side
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "CPJUMP1_STORAGE_ROOT": self.storage_root,
            "CPJUMP1_MODE": "local",
        })
        self.procs: dict[str, subprocess.Popen] = {}
        self.token: str | None = None

    # ------------------------------------------------------------------ processes
    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run an ``airflow`` CLI command against this instance."""
        return subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, check=check, timeout=600)

    def start(self, timeout: float = 300) -> None:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        self.airflow("db", "migrate")
        for name, slots in deploy.DEFAULT_POOL_SLOTS.items():
            self.airflow("pools", "set", name, str(min(slots, 4)), "cpjump1")
        for name, args in {
            "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            "scheduler": ["scheduler"],
            "dag-processor": ["dag-processor"],
        }.items():
            log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env,
                                                cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self.wait_for(self._health_ok, timeout, "the api-server")
        self.token = self.request("GET", "/auth/token", auth=False)["access_token"]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> "EmbeddedAirflow":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.root.glob("*.log")))

    # ------------------------------------------------------------------ REST
    def _health_ok(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"{self.base}/api/v2/monitor/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def request(self, method: str, path: str, body: Any = None, auth: bool = True, ok=(200, 201)) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text, status = r.read().decode(), r.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read().decode(), exc.code
        if status not in ok:
            raise AssertionError(f"{method} {path} -> {status}: {text[:2000]}")
        return json.loads(text) if text else None

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 3.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    @staticmethod
    def _q(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    def wait_dag(self, dag_id: str, timeout: float = 300) -> None:
        """Wait until the DAG processor has parsed ``dag_id``, then unpause it."""
        self.wait_for(lambda: self.request("GET", f"/api/v2/dags?dag_id_pattern={dag_id}")["total_entries"],
                      timeout, f"the DAG processor to parse {dag_id}")
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{self._q(run_id)}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900) -> dict:
        def done():
            run = self.run(dag_id, run_id)
            return run if run["state"] in ("success", "failed") else None

        try:
            return self.wait_for(done, timeout, f"run {run_id}", interval=5)
        except TimeoutError:
            raise TimeoutError(
                f"run {run_id} did not finish\n{self.task_states(dag_id, run_id)}\n{self.logs()}"
            ) from None

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{self._q(run_id)}/taskInstances?limit=500"
        return self.request("GET", path)["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
        return {(t["task_id"], t["map_index"]): t["state"] for t in self.task_instances(dag_id, run_id)}

    def task_log(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, try_number: int = 1) -> str:
        data = self.request(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{self._q(run_id)}/taskInstances/{task_id}/logs/{try_number}"
            f"?map_index={map_index}&full_content=true",
        )
        return json.dumps(data.get("content"))

    def trigger_like_the_ui(self, dag_id: str, conf: dict) -> dict:
        """POST the body the web UI's trigger form sends: every form field, typed, in ``conf``.

        The form starts from the DAG's param defaults (``GET /dags/{id}/details``); ``conf``
        holds the fields the user changed.
        """
        details = self.request("GET", f"/api/v2/dags/{dag_id}/details")
        form = {k: v["value"] for k, v in details["params"].items()}
        form.update(conf)
        body = {
            "conf": form,
            "data_interval_end": None,
            "data_interval_start": None,
            "logical_date": dt.datetime.now(dt.timezone.utc).isoformat(),
            "partition_key": None,
        }
        return self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)
