"""Time `cpjump1 synthesize` for the plate sizes the tests, the demo and the benchmarks use.

There is no other tool a user would run for this (CPJUMP1 images come from the microscope),
so this reports absolute times only.

    uv run python benchmarks/bench_synthesize.py
"""

from __future__ import annotations

import platform
import tempfile
import time

from cpjump1.settings import get_settings
from cpjump1.synthetic import run_synthesize

CASES = [(4, 2, 512), (8, 2, 256), (1, 9, 1080)]


def main() -> None:
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.node()} ({platform.processor() or platform.machine()})")
    print("| wells | sites | size | images | seconds | s/site |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for wells, sites, size in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            s = get_settings(storage_root=tmp)
            t0 = time.perf_counter()
            run_synthesize("2020_11_04_CPJUMP1", "BR00117010", s, wells=wells, sites=sites, size=size, progress=False)
            dt = time.perf_counter() - t0
        n = wells * sites
        print(f"| {wells} | {sites} | {size} | {n * 8} | {dt:.2f} | {dt / n:.2f} |")


if __name__ == "__main__":
    main()
