"""One settings object for every stage, read from the environment, a ``.env`` file and CLI options.

Precedence (highest first): explicit keyword arguments (the CLI passes its options this way),
``CPJUMP1_*`` environment variables, a ``.env`` file in the working directory, defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The repository checkout this package was installed from (editable installs) or ``None``.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    """The project checkout root (the folder holding ``metadata/`` and ``pipelines/``)."""
    return _REPO_ROOT


def _default_dir(name: str) -> str:
    return str(_REPO_ROOT / name)


class StageResources(dict):
    """Kubernetes resource requests/limits for one stage (cpu, memory, gpu)."""


DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "load_data": {"cpu": "500m", "memory": "1Gi"},
    "illum": {"cpu": "1", "memory": "4Gi"},
    "analysis": {"cpu": "1", "memory": "4Gi"},
    "aggregate": {"cpu": "2", "memory": "8Gi"},
    "profiles": {"cpu": "2", "memory": "8Gi"},
    "deep_profiles": {"cpu": "4", "memory": "16Gi", "gpu": "1"},
    "benchmark": {"cpu": "2", "memory": "8Gi"},
    "validate": {"cpu": "500m", "memory": "2Gi"},
}


class Settings(BaseSettings):
    """Where data lives, how stages run, and what they may use.

    Environment variables carry the ``CPJUMP1_`` prefix, e.g. ``CPJUMP1_STORAGE_ROOT``.
    """

    model_config = SettingsConfigDict(
        env_prefix="CPJUMP1_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    #: Root of every output (local path or ``s3://bucket/prefix``).
    storage_root: str = "./data"
    #: Root of the input images; default ``<storage_root>/images``. For the real data the
    #: public Cell Painting Gallery prefix of CPJUMP1, read anonymously.
    images_root: str | None = None
    #: ``local``: stages run as subprocesses; ``kubernetes``: stages run as pods.
    mode: Literal["local", "kubernetes"] = "local"
    #: Read S3 anonymously (public buckets such as the Cell Painting Gallery).
    s3_anonymous: bool = False
    #: S3 endpoint override (an S3-compatible store, or moto in the tests).
    s3_endpoint_url: str | None = None
    #: Bounded retries for storage calls before a clear error.
    storage_retries: int = 3

    #: Folder with the CPJUMP1 facts (plate maps, perturbation metadata).
    metadata_dir: str = Field(default_factory=lambda: _default_dir("metadata"))
    #: Folder with the CellProfiler pipelines and the profiling / DeepProfiler configs.
    pipelines_dir: str = Field(default_factory=lambda: _default_dir("pipelines"))
    #: Folder with the Great Expectations suites (JSON).
    expectations_dir: str = Field(default_factory=lambda: _default_dir("expectations"))

    #: Python interpreters of the stage environments in local mode.
    cellprofiler_python: str = Field(
        default_factory=lambda: _default_dir(".venvs/cellprofiler/bin/python")
    )
    deepprofiler_python: str = Field(
        default_factory=lambda: _default_dir(".venvs/deepprofiler/bin/python")
    )

    #: DeepProfiler model checkpoint (local path or s3:// URL). The Cell Painting CNN weights
    #: cannot be downloaded here; tests and the demo build a small seeded checkpoint.
    deepprofiler_checkpoint: str | None = None

    #: Kubernetes mode: image names and tag, namespace, service account, resources.
    image_registry: str = "ghcr.io/cpjump1"
    image_tag: str = "0.1.0"
    images: dict[str, str] = Field(
        default_factory=lambda: {
            "cellprofiler": "cpjump1-cellprofiler",
            "deepprofiler": "cpjump1-deepprofiler",
            "profiling": "cpjump1-profiling",
            "airflow": "cpjump1-airflow",
        }
    )
    namespace: str = "cpjump1"
    service_account: str = "cpjump1-stage-runner"
    resources: dict[str, dict[str, str]] = Field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    #: Per-stage pod placement, e.g. ``{"deep_profiles": {"nodeSelector": {...}, "tolerations": [...]}}``
    #: (the chart fills it from its values through the settings ConfigMap).
    scheduling: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Kubernetes mode: the storage root is a mounted PersistentVolumeClaim instead of S3.
    storage_pvc: bool = False
    #: ``imagePullPolicy`` of stage containers.
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    #: Schedule of the batch DAGs: ``acquisition`` (one event at the batch's acquisition date,
    #: for backfills), ``none`` (manual only) or a cron expression (periodic reprocessing).
    dag_schedule: str = "acquisition"

    @field_validator("storage_root", "images_root")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.rstrip("/") or "/"

    @property
    def resolved_images_root(self) -> str:
        """``images_root`` or, when unset, ``<storage_root>/images``."""
        from cpjump1.storage import join

        return self.images_root or join(self.storage_root, "images")

    def storage_options(self, url: str) -> dict[str, Any]:
        """fsspec storage options for ``url`` (anonymous access, endpoint, retries)."""
        if url.startswith("s3://"):
            opts: dict[str, Any] = {"anon": self.s3_anonymous}
            endpoint = self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                opts["endpoint_url"] = endpoint
            opts["config_kwargs"] = {
                "retries": {"max_attempts": self.storage_retries, "mode": "standard"},
                "connect_timeout": 5,
                "read_timeout": 30,
            }
            return opts
        return {}

    def image(self, name: str) -> str:
        """Full image reference ``registry/name:tag`` of a stage image."""
        return f"{self.image_registry}/{self.images[name]}:{self.image_tag}"


def get_settings(**overrides: Any) -> Settings:
    """Settings from the environment and ``.env``, with non-``None`` ``overrides`` on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
