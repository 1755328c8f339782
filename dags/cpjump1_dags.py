"""CPJUMP1 DAGs: one per batch of metadata/platemaps (``cpjump1_<batch>``) plus ``cpjump1_benchmark``.

Thin on purpose: the DAG shape lives in ``cpjump1.airflow.builder``; see docs/OPERATIONS.md.
"""

from cpjump1.airflow.builder import build_all

globals().update(build_all())
