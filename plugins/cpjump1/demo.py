"""``make demo``: the embedded default run.

Synthesizes a small plate and lists the catalog. (The Airflow batch DAG in local mode takes
over this entry point as the stages land.)
"""

from __future__ import annotations

import sys

from cpjump1.catalog import load_catalog
from cpjump1.cli import configure_logging
from cpjump1.settings import get_settings
from cpjump1.synthetic import run_synthesize

DEMO_BATCH = "2020_11_04_CPJUMP1"
DEMO_PLATES = ("BR00117010", "BR00117011")


def main() -> int:
    configure_logging()
    settings = get_settings()
    cat = load_catalog(settings.metadata_dir)
    print(f"catalog: {len(cat.batches)} batches, {len(cat.all_plates())} plates")
    for plate in DEMO_PLATES:
        folder = run_synthesize(DEMO_BATCH, plate, settings, wells=8, sites=2, size=256, seed=0)
        print(f"synthetic plate {DEMO_BATCH}/{plate}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
