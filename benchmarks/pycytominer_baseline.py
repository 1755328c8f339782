"""The reference the profiles stage is held to: pycytominer 1.7.1 called step by step with CSV
files in between, as the seed's profiling recipe runs it (annotate → normalize → normalize to
negative controls → feature select per plate, then feature selection over the batch's
concatenated ``_normalized`` / ``_normalized_negcon`` profiles).

One function, :func:`stepwise_pycytominer`, used both by ``tests/test_profiles.py`` (which
proves our files identical to its files) and by ``benchmarks/bench_profiles.py`` (which times
it beside ours), so the test checks the very code the benchmark times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BATCH = "2020_11_04_CPJUMP1"
NEGCON = "Metadata_control_type == 'negcon'"


def stepwise_pycytominer(settings: Any, plates: list[str], out_dir: Path, batch: str = BATCH, progress: bool = False) -> dict[tuple[str, str], Path]:
    """Write every level of every plate of ``plates`` with pycytominer, each step reading the
    previous step's gzip CSV (``%.5g``), into ``out_dir``; returns ``{(plate, level): path}``.

    Inputs: the aggregated ``<plate>.csv.gz`` of each plate under ``settings.storage_root``;
    the plate maps, perturbation tables (renamed as ``pipelines/profiling.yml`` says, written to
    a CSV once per perturbation type) and blocklist of ``settings.metadata_dir``.
    """
    import pandas as pd
    import pycytominer

    from cpjump1 import profiles, storage
    from cpjump1.catalog import PERTURBATION_TABLES, load_catalog

    cfg = profiles.load_config(settings)
    cat = load_catalog(settings.metadata_dir)
    fs = cfg["feature_select"]
    blocklist = [x for x in (Path(settings.metadata_dir) / fs.get("blocklist", "blocklist_features.txt")).read_text().split() if x != "blocklist"]
    fs_kw = dict(operation=fs["operations"], freq_cut=fs["freq_cut"], unique_cut=fs["unique_cut"],
                 corr_threshold=fs["corr_threshold"], na_cutoff=fs["na_cutoff"], blocklist=blocklist)
    io_kw = dict(float_format="%.5g", compression_options="gzip")
    out: dict[tuple[str, str], Path] = {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(plates):
        plate = cat.plate(batch, p)
        meta_path = out_dir / f"{plate.perturbation}_metadata.csv"
        if not meta_path.exists():
            meta = pd.read_csv(cat.root / "external_metadata" / PERTURBATION_TABLES[plate.perturbation], sep="\t")
            meta.rename(columns=(cfg["annotate"]["external"]["rename"].get(plate.perturbation) or {})).to_csv(meta_path, index=False)
        f = {lv: out_dir / f"{p}{sfx}.csv.gz" for lv, sfx in profiles.LEVELS.items()}
        pycytominer.annotate(
            profiles=storage.Layout(settings.storage_root).profile_file(batch, p),
            platemap=str(cat.plate_map_path(batch, plate.plate_map)),
            join_on=["Metadata_well_position", "Metadata_Well"],
            external_metadata=str(meta_path), external_join_on=["Metadata_broad_sample"],
            output_file=str(f["augmented"]), **io_kw,
        )
        for lv, samples in (("normalized", "all"), ("normalized_negcon", NEGCON)):
            pycytominer.normalize(profiles=str(f["augmented"]), method="mad_robustize", mad_robustize_epsilon=0,
                                  samples=samples, output_file=str(f[lv]), **io_kw)
        for src, dst in (("normalized", "feature_select_plate"), ("normalized_negcon", "feature_select_negcon_plate")):
            pycytominer.feature_select(profiles=str(f[src]), output_file=str(f[dst]), **fs_kw, **io_kw)
        out.update({(p, lv): f[lv] for lv in profiles.PLATE_LEVELS})
        if progress:
            print(f"  baseline plate {i + 1}/{len(plates)}", flush=True)
    for src, dst in (("normalized", "feature_select_batch"), ("normalized_negcon", "feature_select_negcon_batch")):
        parts = [pd.read_csv(out[(p, src)]) for p in plates]
        sel = pycytominer.feature_select(profiles=pd.concat(parts, ignore_index=True), **fs_kw)
        meta_cols = [c for c in sel.columns if c.startswith("Metadata_")]
        sel = sel[meta_cols + [c for c in sel.columns if c not in meta_cols]]
        start = 0
        for p, part in zip(plates, parts, strict=True):
            path = out_dir / f"{p}{profiles.LEVELS[dst]}.csv.gz"
            sel.iloc[start : start + len(part)].to_csv(path, index=False, float_format="%.5g", compression="gzip")
            start += len(part)
            out[(p, dst)] = path
    return out


def compare(settings: Any, reference: dict[tuple[str, str], Path], batch: str = BATCH) -> tuple[int, list[str]]:
    """(identical files, names of the differing ones): each of our ``*.csv.gz`` against the
    baseline's, decompressed text compared byte for byte."""
    import gzip

    from cpjump1 import profiles

    same, differ = 0, []
    for (p, lv), path in reference.items():
        ours = gzip.decompress(Path(profiles.level_url(settings, batch, p, lv)).read_bytes())
        if ours == gzip.decompress(Path(path).read_bytes()):
            same += 1
        else:
            differ.append(f"{p}{profiles.LEVELS[lv]}")
    return same, differ
