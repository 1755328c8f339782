"""Batches and plates for DAG generation, read without pandas.

DAG files are parsed every few seconds by the DAG processor, so they must not import the
stage libraries. :mod:`cpjump1.catalog` uses pandas; this module reads the *same* files
(``metadata/platemaps/<batch>/barcode_platemap.csv``) with the ``csv`` module and gives only
what a DAG needs: batch names, plate barcodes in catalog order, and the acquisition date
(the date prefix of the batch name, as in the catalog). ``tests/test_dags.py`` checks that
both views agree.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
from dataclasses import dataclass
from pathlib import Path

from cpjump1.errors import MetadataError


@dataclass(frozen=True)
class BatchInfo:
    name: str
    plates: tuple[str, ...]
    acquisition_date: dt.date

    @property
    def dag_id(self) -> str:
        return dag_id_for(self.name)


def dag_id_for(batch: str) -> str:
    """``cpjump1_<batch>``: the DAG id of a batch."""
    return f"cpjump1_{batch}"


@functools.lru_cache(maxsize=8)
def _read(metadata_dir: str) -> tuple[BatchInfo, ...]:
    root = Path(metadata_dir) / "platemaps"
    if not root.is_dir():
        raise MetadataError(f"{root}: plate map folder not found (set CPJUMP1_METADATA_DIR)")
    out = []
    for batch_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        path = batch_dir / "barcode_platemap.csv"
        if not path.is_file():
            raise MetadataError(f"{path}: missing")
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if "Assay_Plate_Barcode" not in (reader.fieldnames or []):
                raise MetadataError(f"{path}: no Assay_Plate_Barcode column")
            plates = tuple(row["Assay_Plate_Barcode"].strip() for row in reader if row.get("Assay_Plate_Barcode"))
        try:
            date = dt.date(*(int(x) for x in batch_dir.name.split("_")[:3]))
        except (TypeError, ValueError):
            raise MetadataError(
                f"{batch_dir}: batch name must start with its acquisition date YYYY_MM_DD"
            ) from None
        out.append(BatchInfo(batch_dir.name, plates, date))
    return tuple(out)


def batches(metadata_dir: str | Path) -> dict[str, BatchInfo]:
    """Every batch of the metadata folder, by name."""
    return {b.name: b for b in _read(str(Path(metadata_dir).resolve()))}
