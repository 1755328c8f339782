"""CPJUMP1 DAGs: one per batch of metadata/platemaps (``cpjump1_<batch>``) plus ``cpjump1_benchmark``.

Thin on purpose: the DAG shape lives in ``cpjump1.airflow.builder``; see docs/OPERATIONS.md.
"""

# Top-level Airflow imports of a DAG file are pre-imported ONCE by the DAG processor's manager
# ([dag_processor] parsing_pre_import_modules) and inherited by every parsing process; listing the
# Kubernetes provider here keeps its ~2 s import (the Kubernetes client) out of each parse in
# kubernetes mode. Local mode does not use it.
import airflow.providers.cncf.kubernetes.operators.job  # noqa: F401
import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401
import airflow.sdk  # noqa: F401

from cpjump1.airflow.builder import build_all

globals().update(build_all())
