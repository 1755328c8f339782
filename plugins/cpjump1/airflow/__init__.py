"""Airflow integration of cpjump1: the operator factory, the DAG builder, trigger-form params
and the end-of-run summary.

Importing this package imports nothing heavy; DAG files import
:mod:`cpjump1.airflow.builder`, which needs only Airflow's task SDK and the standard library
at parse time (stage libraries such as pandas are imported inside task code only).
"""
