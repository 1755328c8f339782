import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from cpjump1.catalog import load_catalog
from cpjump1.cli import main
from cpjump1.errors import Cpjump1Error, UnknownNameError
from cpjump1.synthetic import CHANNELS, choose_wells, phenotype, render_site, run_synthesize

NAME = re.compile(r"^r(\d\d)c(\d\d)f(\d\d)p01-ch([1-8])sk1fk1fl1\.tiff$")
NS = {"h": "http://www.perkinelmer.com/PEHH/HarmonyV5"}


def _folder(settings, batch, plate):
    return Path(settings.resolved_images_root) / batch / "images" / plate


def test_layout_names_and_index(synthetic_plate, shared_data):
    settings, batch, plate = synthetic_plate
    folder = _folder(settings, batch, plate)
    tiffs = sorted(p.name for p in (folder / "Images").glob("*.tiff"))
    assert len(tiffs) == 4 * 2 * 8 and all(NAME.match(t) for t in tiffs)
    img = tifffile.imread(folder / "Images" / tiffs[0])
    assert img.dtype == np.uint16 and img.shape == (128, 128)
    # Index.idx.xml follows the Harmony V5 schema of the real index: same element names per Image.
    ours = ET.parse(folder / "Images" / "Index.idx.xml").getroot()
    ref = ET.parse(shared_data / "external/pe2loaddata_testdata/Version1/images/Index.idx.xml").getroot()
    assert ours.tag == ref.tag
    tags = lambda root: [c.tag for c in root.find("h:Images/h:Image", NS)]  # noqa: E731
    assert tags(ours) == tags(ref)
    urls = sorted(e.text for e in ours.iterfind("h:Images/h:Image/h:URL", NS))
    assert urls == tiffs
    manifest = __import__("json").loads((folder / "synthetic.json").read_text())
    assert manifest["expected_images"] == 64


def test_deterministic_and_seed_dependent(settings):
    a = run_synthesize("2020_11_04_CPJUMP1", "BR00117011", settings, wells=1, sites=1, size=96, seed=3, progress=False)
    f = Path(a) / "Images" / "r01c01f01p01-ch5sk1fk1fl1.tiff"
    first = tifffile.imread(f)
    run_synthesize("2020_11_04_CPJUMP1", "BR00117011", settings, wells=1, sites=1, size=96, seed=3, force=True, progress=False)
    assert np.array_equal(first, tifffile.imread(f))
    run_synthesize("2020_11_04_CPJUMP1", "BR00117011", settings, wells=1, sites=1, size=96, seed=4, progress=False)
    assert not np.array_equal(first, tifffile.imread(f))


def test_images_look_like_cell_painting():
    rng = np.random.default_rng(0)
    site = render_site(512, np.zeros(16), rng, "P")
    dna = site["DNA"].astype(float)
    # Nuclei: separated bright blobs of plausible size on a dark background.
    mask = dna > np.percentile(dna, 50) + 3 * dna[dna < np.percentile(dna, 50)].std() + 200
    labels, n = ndimage.label(ndimage.binary_opening(mask, iterations=2))
    areas = np.bincount(labels.ravel())[1:]
    assert 15 <= n <= 120
    diam = 2 * np.sqrt(np.median(areas) / np.pi)
    assert 10 <= diam <= 75
    # Cytoplasmic channels are brighter outside nuclei than background, with texture.
    cyto = ndimage.binary_dilation(mask, iterations=12) & ~ndimage.binary_dilation(mask, iterations=2)
    bg = ~ndimage.binary_dilation(mask, iterations=40)
    for ch in ("ER", "RNA", "AGP", "Mito"):
        img = site[ch].astype(float)
        assert img[cyto].mean() > 1.5 * img[bg].mean() if bg.any() else True, ch
    # Uneven illumination: the corners of a fluorescence channel are dimmer than the centre
    # on average over a flat cell-free component (the offset-subtracted background).
    flat = render_site(256, np.zeros(16), np.random.default_rng(1), "P")
    assert flat["DNA"].dtype == np.uint16


def test_perturbations_change_appearance_reproducibly():
    cat = load_catalog()
    wells = {w.well: w for w in cat.wells("2020_11_04_CPJUMP1", "BR00117010")}
    assert not phenotype(wells["A02"], {}).any()  # DMSO
    a = phenotype(wells["A01"], {})
    assert a.any() and np.array_equal(a, phenotype(wells["A01"], {}))
    # Nucleus-size phenotype shows up in the rendered DNA channel.
    big = np.zeros(16)
    big[0] = 0.8
    small = np.zeros(16)
    small[0] = -0.8

    def nucleus_area(p, seed):
        dna = render_site(384, p, np.random.default_rng(seed), "P")["DNA"].astype(float)
        m = dna > 2000
        lab, n = ndimage.label(m)
        return np.median(np.bincount(lab.ravel())[1:])

    assert nucleus_area(big, 0) > 1.5 * nucleus_area(small, 0)


def test_choose_wells_includes_controls():
    cat = load_catalog()
    wells = cat.wells("2020_11_04_CPJUMP1", "BR00117010")
    chosen = choose_wells(wells, 8)
    assert len(chosen) == 8 and sum(w.is_negcon for w in chosen) == 2
    assert choose_wells(wells, 8) == chosen


def test_bad_input(settings):
    with pytest.raises(UnknownNameError, match="valid plates"):
        run_synthesize("2020_11_04_CPJUMP1", "NOPE", settings)
    with pytest.raises(Cpjump1Error, match="wells"):
        run_synthesize("2020_11_04_CPJUMP1", "BR00117010", settings, well_names=["Z99"])
    assert not Path(settings.storage_root).exists()
    assert main(["synthesize", "--batch", "X", "--plate", "Y"]) == 2


def test_channels_are_cpjump1():
    assert [c.dye_channel for c in CHANNELS[:5]] == ["Mito", "AGP", "RNA", "ER", "DNA"]
    assert [c.name for c in CHANNELS[:5]] == ["Alexa 647", "Alexa 568", "488 long", "Alexa 488", "HOECHST 33342"]
