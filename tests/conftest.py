"""Shared fixtures: the real CPJUMP1 data in ../shared/cpjump1, isolated settings, synthetic plates."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "cpjump1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real CPJUMP1 data (profiles, plate maps, one JUMP site); skip when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared CPJUMP1 data not found at {SHARED}")
    return SHARED


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings whose storage root is a fresh temporary folder (no .env or env leaks)."""
    for var in [v for v in __import__("os").environ if v.startswith("CPJUMP1_")]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    from cpjump1.settings import get_settings

    return get_settings(storage_root=str(tmp_path / "data"))


@pytest.fixture(scope="session")
def synthetic_plate(tmp_path_factory):
    """A tiny synthetic compound plate (4 wells x 2 sites x 128 px), made once per session.

    Returns (settings, batch, plate)."""
    from cpjump1.settings import get_settings
    from cpjump1.synthetic import run_synthesize

    root = tmp_path_factory.mktemp("synthetic")
    s = get_settings(storage_root=str(root / "data"))
    batch, plate = "2020_11_04_CPJUMP1", "BR00117010"
    run_synthesize(batch, plate, s, wells=4, sites=2, size=128, seed=0, progress=False)
    return s, batch, plate
