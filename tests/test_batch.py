"""Streaming, resumable batch picking (napari_pupick.batch): serial and on a dask.distributed LocalCluster of two
worker processes, with a worker killed mid-run, an interrupted run resumed and a corrupt micrograph.

The model is a random-initialised conv3 at a quarter width (picks are meaningless but deterministic, which is
what these tests compare); the threshold is low so every micrograph has picks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import starfile

from napari_pupick.batch import (
    SIDECAR_DIR,
    close_client,
    is_complete,
    plan_items,
    resolve_settings,
    run_batch,
    start_client,
    write_combined,
)
from napari_pupick.io import read_coordinates, write_coordinates

N_MICROGRAPHS = 10


@pytest.fixture(scope="module")
def micrographs(tmp_path_factory) -> list[Path]:
    from napari_pupick.synthetic import make_synthetic

    synth = make_synthetic(n_micrographs=N_MICROGRAPHS, shape=(160, 192), n_particles=10, radius=8, seed=2)
    return synth.write(tmp_path_factory.mktemp("batch"))["micrographs"]


@pytest.fixture(scope="module")
def serial_reference(tiny_model, micrographs, tmp_path_factory):
    """The serial run every other run is compared with: ``(folder, files, result)``."""
    out = tmp_path_factory.mktemp("serial")
    result = run_batch(tiny_model, micrographs, out / "parts", combined=out / "all.star")
    assert result.ok and len(result.done) == N_MICROGRAPHS
    return out / "parts", outputs(out / "parts"), result


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes (one thread each), through the batch module's own start_client."""
    c = start_client(workers=2)
    c.wait_for_workers(2, timeout=60)
    yield c
    close_client(c)


def outputs(folder: Path) -> dict[str, bytes]:
    """Every per-micrograph file under ``folder`` (sidecars excluded): relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and SIDECAR_DIR not in p.relative_to(folder).parts}


def test_serial_run_writes_one_file_and_sidecar_per_micrograph(serial_reference, micrographs, tiny_model):
    folder, files, result = serial_reference
    assert sorted(files) == sorted(f"{p.stem}.star" for p in micrographs)
    for p in micrographs:
        table = starfile.read(folder / f"{p.stem}.star")
        assert list(table.columns) == ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"]
        assert len(table) > 0
        meta = json.loads((folder / SIDECAR_DIR / f"{p.stem}.star.json").read_text())
        assert meta["n_picks"] == len(table) and meta["source"] == str(p)
    assert result.n_picks == sum(len(starfile.read(folder / f)) for f in files)
    assert set(result.timings) == {"read", "prepare", "score", "extract", "write"}
    assert "10 done, 0 skipped" in result.summary()


def test_combined_file_lists_every_micrograph_once(serial_reference, micrographs):
    folder = serial_reference[0]
    combined = starfile.read(folder.parent / "all.star")
    names = [Path(p).name for p in micrographs]
    assert list(dict.fromkeys(combined["rlnMicrographName"])) == names  # in order, each as one contiguous block
    for p in micrographs:
        rows = combined[combined["rlnMicrographName"] == p.name]
        own = starfile.read(folder / f"{p.stem}.star")
        np.testing.assert_array_equal(rows["rlnCoordinateX"].to_numpy(), own["rlnCoordinateX"].to_numpy())
        np.testing.assert_array_equal(rows["rlnAutopickFigureOfMerit"].to_numpy(),
                                      own["rlnAutopickFigureOfMerit"].to_numpy())


def test_rerun_skips_complete_micrographs_and_overwrite_redoes_them(serial_reference, micrographs, tiny_model,
                                                                    tmp_path):
    parts = tmp_path / "parts"
    first = run_batch(tiny_model, micrographs[:4], parts)
    again = run_batch(tiny_model, micrographs[:4], parts)
    assert (len(again.done), len(again.skipped)) == (0, 4)
    # other settings are another output: nothing counts as complete
    other = run_batch(tiny_model, micrographs[:4], parts, threshold=0.0)
    assert len(other.done) == 4 and not other.skipped
    assert len(run_batch(tiny_model, micrographs[:4], parts, threshold=0.0, overwrite=True).done) == 4
    assert first.ok


def test_distributed_picks_equal_the_serial_run(serial_reference, micrographs, tiny_model, client, tmp_path):
    _, reference, _ = serial_reference
    result = run_batch(tiny_model, micrographs, tmp_path / "parts", combined=tmp_path / "all.star", client=client)
    assert result.ok and sorted(result.done) == sorted(micrographs)
    assert outputs(tmp_path / "parts") == reference
    # the combined file follows the input order, whatever the order of completion
    assert (tmp_path / "all.star").read_bytes() == (serial_reference[0].parent / "all.star").read_bytes()


def test_a_killed_worker_loses_no_micrograph_and_duplicates_none(serial_reference, micrographs, tiny_model, client,
                                                                 tmp_path):
    """The worker that reads the fourth micrograph kills its own process the first time (a marker file makes it
    once); the scheduler moves its tasks to the other worker and the nanny restarts it."""
    _, reference, _ = serial_reference
    marker = tmp_path / "killed"
    victim = str(micrographs[3])

    def install(marker=str(marker), victim=victim):
        from napari_pupick import io

        original = getattr(io.read_micrograph, "original", io.read_micrograph)

        def read_micrograph(path):
            if str(path) == victim and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the worker process dies mid-task
            return original(path)

        read_micrograph.original = original
        io.read_micrograph = read_micrograph

    def uninstall():
        from napari_pupick import io

        io.read_micrograph = getattr(io.read_micrograph, "original", io.read_micrograph)

    client.run(install)
    seen = []
    try:
        result = run_batch(tiny_model, micrographs, tmp_path / "parts", combined=tmp_path / "all.star",
                           client=client, on_result=lambda item, res: seen.append(item.path))
    finally:
        client.run(uninstall)
    assert marker.exists(), "no worker was killed"
    assert result.ok, result.summary()
    assert sorted(seen) == sorted(micrographs) and len(seen) == len(set(seen))
    assert sorted(result.done) == sorted(micrographs)
    assert outputs(tmp_path / "parts") == reference
    combined = starfile.read(tmp_path / "all.star")
    assert len(combined) == result.n_picks
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker


@pytest.mark.parametrize("engine", ["serial", "distributed"])
def test_interrupted_run_resumes_to_the_same_files(serial_reference, micrographs, tiny_model, tmp_path, engine,
                                                   request):
    _, reference, _ = serial_reference
    client = request.getfixturevalue("client") if engine == "distributed" else None
    parts = tmp_path / "parts"
    done_before = []

    def stop_halfway(item, res):
        done_before.append(item.path)
        if len(done_before) == N_MICROGRAPHS // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(tiny_model, micrographs, parts, combined=tmp_path / "all.star", client=client,
                  on_result=stop_halfway)
    assert not (tmp_path / "all.star").exists()
    assert len(outputs(parts)) == N_MICROGRAPHS // 2
    resumed = run_batch(tiny_model, micrographs, parts, combined=tmp_path / "all.star", client=client)
    assert sorted(resumed.skipped) == sorted(done_before)
    assert sorted(resumed.done) == sorted(set(micrographs) - set(done_before))
    assert outputs(parts) == reference
    assert (tmp_path / "all.star").read_bytes() == (serial_reference[0].parent / "all.star").read_bytes()
    assert not [p for p in parts.rglob("*.tmp")]


def test_a_half_written_micrograph_is_redone(serial_reference, micrographs, tiny_model, tmp_path):
    """A coordinate file without its sidecar (killed between the two writes), or one whose size differs from
    what its sidecar says, is not complete."""
    parts = tmp_path / "parts"
    run_batch(tiny_model, micrographs[:3], parts)
    (parts / SIDECAR_DIR / f"{micrographs[0].stem}.star.json").unlink()
    with open(parts / f"{micrographs[1].stem}.star", "a") as fh:
        fh.write("1 2 3\n")
    settings = resolve_settings(tiny_model)
    items = plan_items(micrographs[:3], parts)
    assert [is_complete(i, settings) for i in items] == [False, False, True]
    again = run_batch(tiny_model, micrographs[:3], parts)
    assert sorted(again.done) == sorted(micrographs[:2]) and again.skipped == [micrographs[2]]
    assert outputs(parts) == {k: v for k, v in serial_reference[1].items()
                              if k in {f"{p.stem}.star" for p in micrographs[:3]}}


@pytest.mark.parametrize("engine", ["serial", "distributed"])
def test_a_corrupt_micrograph_is_reported_and_the_others_are_written(micrographs, tiny_model, tmp_path, engine,
                                                                    request, serial_reference):
    client = request.getfixturevalue("client") if engine == "distributed" else None
    bad = tmp_path / "broken.mrc"
    data = micrographs[0].read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a truncated MRC: a valid header, half the pixels
    paths = [*micrographs[:3], bad, *micrographs[3:5]]
    result = run_batch(tiny_model, paths, tmp_path / "parts", combined=tmp_path / "all.star", client=client)
    assert not result.ok
    assert [p for p, _ in result.failed] == [bad]
    assert str(bad) in result.failed[0][1]
    assert "broken.mrc" in result.summary() and "1 failed" in result.summary()
    assert sorted(result.done) == sorted([*micrographs[:5]])
    assert outputs(tmp_path / "parts") == {k: v for k, v in serial_reference[1].items()
                                           if k in {f"{p.stem}.star" for p in micrographs[:5]}}
    combined = starfile.read(tmp_path / "all.star")
    assert set(combined["rlnMicrographName"]) == {p.name for p in micrographs[:5]}
    last = json.loads((tmp_path / "parts" / SIDECAR_DIR / "last_run.json").read_text())
    assert last["failed"][0][0] == str(bad)
    # a rerun retries only the failed micrograph
    again = run_batch(tiny_model, paths, tmp_path / "parts", client=client)
    assert len(again.skipped) == 5 and [p for p, _ in again.failed] == [bad]


@pytest.mark.parametrize("fmt,ext", [("csv", ".csv"), ("topaz", ".txt"), ("star", ".star")])
def test_combined_writers_give_the_names_write_coordinates_gives(tmp_path, fmt, ext):
    """Names that end in a micrograph extension (``x.tif`` from ``x.tif.mrc``) are protected the same way in the
    streamed combined file as by io.write_coordinates, and read back the same."""
    import pandas as pd

    from napari_pupick.batch import BatchItem

    table = pd.DataFrame({"micrograph": ["x.tif", "x.tif", "plain", "May08_03.15.02"], "x": [10.0, 20.0, 30.0, 5.0],
                          "y": [5.0, 6.0, 7.0, 8.0], "score": [0.5, -1.25, 2.0, 3.0]})
    parts = tmp_path / "parts"
    items = []
    for name, group in table.groupby("micrograph", sort=False):
        target = parts / f"{name}{ext}"
        parts.mkdir(exist_ok=True)
        write_coordinates(group, target, format=fmt)
        sidecar = parts / SIDECAR_DIR / f"{name}{ext}.json"
        sidecar.parent.mkdir(exist_ok=True)
        sidecar.write_text("{}")
        items.append(BatchItem(Path(f"{name}.mrc"), name, target, sidecar))
    streamed = write_combined(items, tmp_path / f"streamed{ext}", fmt_items=fmt)
    direct = write_coordinates(table, tmp_path / f"direct{ext}")
    assert streamed.read_text() == direct.read_text()
    back = read_coordinates(streamed)
    assert list(back["micrograph"]) == list(table["micrograph"])


def test_empty_combined_file_has_a_header(tmp_path):
    for ext in (".csv", ".txt", ".star"):
        path = write_combined([], tmp_path / f"none{ext}")
        assert len(read_coordinates(path)) == 0


def test_a_micrograph_without_picks_still_gets_a_file_and_counts_complete(micrographs, tiny_model, tmp_path):
    result = run_batch(tiny_model, micrographs[:2], tmp_path / "parts", threshold=1e9,
                       combined=tmp_path / "all.csv")
    assert result.ok and result.n_picks == 0
    for p in micrographs[:2]:
        assert len(read_coordinates(tmp_path / "parts" / f"{p.stem}.star")) == 0
    assert len(read_coordinates(tmp_path / "all.csv")) == 0
    assert len(run_batch(tiny_model, micrographs[:2], tmp_path / "parts", threshold=1e9).skipped) == 2


def test_cli_extract_joins_a_running_scheduler(micrographs, tiny_model, client, tmp_path, capsys,
                                               serial_reference):
    from napari_pupick.cli import main

    address = client.scheduler.address
    out = tmp_path / "picks.star"
    rc = main(["extract", *map(str, micrographs), "--model", str(tiny_model), "-o", str(out),
               "--scheduler", address, "-q"])
    assert rc == 0
    assert outputs(tmp_path / "picks_per_micrograph") == serial_reference[1]
    assert out.read_bytes() == (serial_reference[0].parent / "all.star").read_bytes()
    assert f"{N_MICROGRAPHS} done" in capsys.readouterr().out
    assert client.status == "running"  # joining a scheduler leaves it (and its client) running
