"""The STAR file docs/cryosparc.md tells users to import into cryoSPARC: one table whose rlnMicrographName is the
micrograph's file name (what cryoSPARC matches against its exposures) and rlnCoordinateX/Y in pixels of the
full-size micrograph (not the binned grid the model scores on), x = column, y = row."""

from __future__ import annotations

from pathlib import Path

import starfile

from napari_pupick.cli import main


def test_combined_star_has_the_columns_cryosparc_import_needs(tiny_model, tmp_path):
    from napari_pupick.synthetic import make_synthetic

    synth = make_synthetic(n_micrographs=3, shape=(160, 192), n_particles=10, radius=8, seed=5)
    mics = synth.write(tmp_path)["micrographs"]
    out = tmp_path / "picks.star"
    assert main(["extract", *map(str, mics), "--model", str(tiny_model), "-o", str(out), "-q"]) == 0
    table = starfile.read(out)  # one loop: what cryoSPARC's STAR import reads
    assert {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"} <= set(table.columns)
    assert "rlnAutopickFigureOfMerit" in table.columns
    assert set(table["rlnMicrographName"]) == {Path(m).name for m in mics}  # file names, with the extension
    # the model bins by 2: coordinates are nevertheless in full-size micrograph pixels
    assert table["rlnCoordinateX"].between(0, 191).all() and table["rlnCoordinateY"].between(0, 159).all()
    assert table["rlnCoordinateX"].max() > 96 and table["rlnCoordinateY"].max() > 80
