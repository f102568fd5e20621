"""RELION 5 External jobs: pick with a trained model, or train one from a ManualPick job's coordinates.

RELION's External job runs ``<executable> --o <job dir> [--in_mics F] [--in_coords F] [--in_parts F]
[--<param label> <value> ...] --j <threads>`` from the project directory (see docs/relion.md). The files written
follow RELION's own AutoPick layout:

- one coordinate STAR file per micrograph (``rlnCoordinateX``, ``rlnCoordinateY``, ``rlnAutopickFigureOfMerit``)
  at ``<job dir>/<micrograph directory>/<stem>_autopick.star``, where the micrograph directory is the one in
  ``rlnMicrographName`` without its leading ``<JobType>/jobNNN/`` (``MotionCorr/job002/Movies/a.mrc`` ->
  ``External/job012/Movies/a_autopick.star``), as RELION's AutoPick does; the whole relative directory is kept
  when stripping would make two micrographs share a file;
- ``<job dir>/autopick.star``: block ``data_coordinate_files``, loop ``rlnMicrographName`` (the name as in the
  input) and ``rlnMicrographCoordinates`` (the file, relative to the project);
- ``<job dir>/RELION_OUTPUT_NODES.star``: block ``data_output_nodes``, loop ``rlnPipeLineNodeName`` and
  ``rlnPipeLineNodeTypeLabel`` (``MicrographsCoords.star.relion.autopick`` for the coordinates);
- ``RELION_JOB_EXIT_SUCCESS`` or ``RELION_JOB_EXIT_FAILURE`` in the job directory, last.

Picking runs :func:`napari_pupick.batch.run_batch` underneath: files are written as micrographs finish, and a
job run again (RELION's "Continue") skips the micrographs already complete.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path, PurePosixPath

import pandas as pd

from napari_pupick.errors import CoordinateError, PupickError

__all__ = ["main", "pick_main", "read_coordinate_files", "read_micrographs_star", "read_relion_labels",
           "relion_pick", "relion_targets", "relion_train", "train_main", "write_output_nodes"]

#: Node type labels (RELION 4/5 pipeline labels).
COORDS_NODE = "MicrographsCoords.star.relion.autopick"
MODEL_NODE = "ProcessData.pt.pupick.model"
EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"


# ---------------------------------------------------------------------------------------------------------------
# RELION's STAR tables


def _table(path, block: str | None, needed: list[str]) -> pd.DataFrame:
    """The loop of ``block`` (or the first loop holding ``needed``) as text columns; named errors."""
    from napari_pupick.io.star import parse_star

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CoordinateError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    blocks = [b for b in parse_star(text, path) if b.columns]
    chosen = [b for b in blocks if b.name == block] if block else []
    if not chosen:
        chosen = [b for b in blocks if all(c in b.columns for c in needed)]
    if not chosen:
        found = "; ".join(f"data_{b.name}: {', '.join(b.columns)}" for b in blocks) or "no loops"
        raise CoordinateError(f"{path}: no table with {', '.join(needed)} (found {found})")
    b = chosen[0]
    missing = [c for c in needed if c not in b.columns]
    if missing:
        raise CoordinateError(f"{path}: data_{b.name} lacks {', '.join(missing)}")
    return pd.DataFrame(b.rows, columns=b.columns, dtype=object)


def read_micrographs_star(path) -> pd.DataFrame:
    """RELION's micrographs STAR (``data_optics`` and ``data_micrographs``; a single table of RELION 3.0 works
    too): the micrographs table, with ``rlnMicrographPixelSize`` from the optics group when known."""
    from napari_pupick.io.star import parse_star

    mics = _table(path, "micrographs", ["rlnMicrographName"])
    blocks = {b.name: b for b in parse_star(Path(path).read_text(encoding="utf-8-sig"), path) if b.columns}
    optics = blocks.get("optics")
    if optics is not None and "rlnOpticsGroup" in mics.columns and "rlnOpticsGroup" in optics.columns:
        table = pd.DataFrame(optics.rows, columns=optics.columns, dtype=object)
        for col in ("rlnMicrographPixelSize", "rlnImagePixelSize"):
            if col in table.columns and "rlnMicrographPixelSize" not in mics.columns:
                size = dict(zip(table["rlnOpticsGroup"], table[col]))
                mics["rlnMicrographPixelSize"] = [size.get(g) for g in mics["rlnOpticsGroup"]]
    if not len(mics):
        raise CoordinateError(f"{path}: the micrographs table is empty")
    return mics


def read_coordinate_files(path) -> pd.DataFrame:
    """A ``data_coordinate_files`` table (ManualPick's ``manualpick.star``, AutoPick's ``autopick.star``):
    columns ``rlnMicrographName``, ``rlnMicrographCoordinates``."""
    return _table(path, "coordinate_files", ["rlnMicrographName", "rlnMicrographCoordinates"])


def _write_star(path: Path, columns: list[str], rows, block: str) -> Path:
    from napari_pupick.io.atomic import write_text
    from napari_pupick.io.star import format_value, write_star_text

    return write_text(path, write_star_text(columns, [[format_value(v) for v in r] for r in rows], block))


def write_output_nodes(job_dir, nodes: list[tuple[str, str]]) -> Path:
    """``RELION_OUTPUT_NODES.star``: one row per ``(node file relative to the project, type label)``."""
    return _write_star(Path(job_dir) / "RELION_OUTPUT_NODES.star", ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel"],
                       nodes, "output_nodes")


def _start(job_dir: Path) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
        (job_dir / name).unlink(missing_ok=True)


def _finish(job_dir: Path, ok: bool) -> None:
    (job_dir / (EXIT_SUCCESS if ok else EXIT_FAILURE)).touch()


def _is_job_dir(part: str) -> bool:
    return part.startswith("job") and part[3:].isdigit()


def relion_targets(mic_names, job_dir, suffix: str = "_autopick") -> list[Path]:
    """Per-micrograph coordinate files for RELION micrograph paths (relative to the project): RELION's AutoPick
    layout, ``<job dir>/<directory without JobType/jobNNN>/<stem><suffix>.star``; the whole relative directory
    is kept for every micrograph when the short form would make two share a file."""
    from napari_pupick.io import micrograph_name

    job_dir = Path(job_dir)

    def parts(name: str, strip: bool):
        p = PurePosixPath(name.replace("\\", "/"))
        dirs = [d for d in p.parent.parts if d not in ("/", "..", ".", "")]
        if strip and len(dirs) >= 2 and _is_job_dir(dirs[1]):
            dirs = dirs[2:]
        return dirs

    for strip in (True, False):
        targets = [job_dir.joinpath(*parts(str(n), strip), f"{micrograph_name(n)}{suffix}.star") for n in mic_names]
        if len(set(targets)) == len(targets):
            return targets
    seen = {}
    for n, t in zip(mic_names, targets):
        if t in seen:
            raise CoordinateError(f"micrographs {seen[t]} and {n} would both write {t}")
        seen[t] = n
    return targets  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------------
# The jobs


def relion_pick(o, in_mics, model, *, threshold=None, radius=None, margin=None, j: int = 1, workers=None,
                scheduler=None, device: str = "auto", overwrite: bool = False, progress: bool = False,
                log=print) -> bool:
    """Pick every micrograph of ``in_mics`` with ``model`` into RELION job directory ``o`` (paths relative to
    the project = the current directory). Returns True when every micrograph was picked.

    ``j`` > 1 picks on a LocalCluster of ``j`` worker processes (``workers`` overrides, ``scheduler`` joins a
    running cluster); otherwise serially. Threshold, radius and margin default to the model's own.
    """
    from napari_pupick.batch import close_client, run_batch, start_client

    job_dir = Path(o)
    mics = read_micrographs_star(in_mics)
    names = [str(n) for n in mics["rlnMicrographName"]]
    paths = [Path(n) for n in names]
    targets = relion_targets(names, job_dir)
    from napari_pupick.io import micrograph_name

    n_workers = workers if workers else (j if j and j > 1 and not scheduler else None)
    client = start_client(n_workers, scheduler) if (n_workers or scheduler) else None
    try:
        result = run_batch(Path(model).resolve(), paths, job_dir, format="star", threshold=threshold,
                           radius=radius, margin=margin, overwrite=overwrite, device=device, client=client,
                           targets=targets, names=[micrograph_name(n) for n in names], progress=progress)
    finally:
        if client is not None:
            close_client(client)
    complete = set(result.done) | set(result.skipped)
    rows = [(n, str(t)) for n, p, t in zip(names, paths, targets) if p in complete]
    coords = _write_star(job_dir / "autopick.star", ["rlnMicrographName", "rlnMicrographCoordinates"], rows,
                         "coordinate_files")
    write_output_nodes(job_dir, [(str(coords), COORDS_NODE)])
    log(result.summary())
    log(f"{len(rows)} of {len(names)} micrographs listed in {coords}")
    return result.ok


def read_relion_labels(in_coords=None, in_parts=None) -> pd.DataFrame:
    """Labelled particles from a ManualPick job (``in_coords``: its ``data_coordinate_files`` STAR, each row a
    micrograph and its coordinate file, relative to the project) or a particles STAR (``in_parts``, with
    ``rlnMicrographName``): one pick table, micrographs named as :func:`~napari_pupick.io.micrograph_name` does."""
    from napari_pupick.io import micrograph_name, read_coordinates

    parts = []
    if in_coords:
        table = read_coordinate_files(in_coords)
        for mic, coords in zip(table["rlnMicrographName"], table["rlnMicrographCoordinates"]):
            if not Path(coords).is_file():  # ManualPick lists micrographs nobody picked on, without a file
                continue
            parts.append(read_coordinates(coords, format="star").assign(micrograph=micrograph_name(mic)))
    if in_parts:
        parts.append(read_coordinates(in_parts, format="star"))
    parts = [p for p in parts if len(p)]
    if not parts:
        raise CoordinateError(f"no labelled particles in {in_coords or in_parts}")
    return pd.concat(parts, ignore_index=True)


def relion_train(o, in_mics, *, radius, in_coords=None, in_parts=None, extra=(), j: int = 1,
                 log=print) -> bool:
    """Train a model in RELION job directory ``o`` from a ManualPick job's coordinates (``in_coords``) or a
    particles STAR (``in_parts``) on the micrographs of ``in_mics`` (all of them give unlabeled regions), as
    ``pupick train`` does with its defaults; writes ``<o>/model.pt`` and its output node."""
    from napari_pupick.cli import main as pupick_main
    from napari_pupick.io import write_coordinates

    job_dir = Path(o)
    mics = read_micrographs_star(in_mics)
    labels = read_relion_labels(in_coords, in_parts)
    labels_file = write_coordinates(labels, job_dir / "labels.star")
    model = job_dir / "model.pt"
    argv = ["train", *map(str, mics["rlnMicrographName"]), "--labels", str(labels_file), "--radius", str(radius),
            "-o", str(model), "--threads", str(max(1, int(j or 1))), *extra]
    log("pupick " + " ".join(argv))
    rc = pupick_main(argv)
    if rc == 0:
        write_output_nodes(job_dir, [(str(model), MODEL_NODE)])
    return rc == 0


# ---------------------------------------------------------------------------------------------------------------
# Command line (``pupick relion pick|train``, ``pupick-relion-pick``, ``pupick-relion-train``)


def add_parsers(sub) -> None:
    """The ``pick`` and ``train`` sub-commands, with the arguments RELION's External job passes."""
    for name in ("pick", "train"):
        p = sub.add_parser(name, help=f"RELION External job: {name}",
                           description=f"RELION 5 External job ({name}). Run from the RELION project directory; "
                           "see docs/relion.md.")
        p.add_argument("--o", required=True, help="the job directory RELION gives (e.g. External/job012/)")
        p.add_argument("--in_mics", required=True, help="micrographs STAR (data_optics, data_micrographs)")
        p.add_argument("--j", type=int, default=1, help="RELION's threads: worker processes for picking, torch "
                       "threads for training [default: 1]")
        p.add_argument("--radius", type=float, default=None, required=(name == "train"),
                       help="particle radius in micrograph pixels" + (" [default: the model's]" if name == "pick"
                                                                       else ""))
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps [default: auto]")
        p.add_argument("--pipeline_control", default=None, help=argparse.SUPPRESS)
        if name == "pick":
            p.add_argument("--model", required=True, help="checkpoint from pupick train (or a training job's "
                           "model.pt)")
            p.add_argument("--threshold", type=float, default=None,
                           help="logit threshold [default: the model's calibrated one]")
            p.add_argument("--margin", type=float, default=None, help="edge margin, pixels [default: the model's]")
            p.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes (overrides --j)")
            p.add_argument("--scheduler", default=None, help="dask.distributed scheduler address to join")
            p.add_argument("--overwrite", action="store_true", help="redo micrographs already complete")
        else:
            p.add_argument("--in_coords", default=None, help="ManualPick job's coordinates (manualpick.star)")
            p.add_argument("--in_parts", default=None, help="or a particles STAR with rlnMicrographName")
            p.add_argument("--expected", type=float, default=None, help="expected particles per micrograph")
            p.add_argument("--epochs", type=int, default=None, help="training epochs")
            p.add_argument("--steps", type=int, default=None, help="minibatches per epoch")
        p.set_defaults(relion_job=name)


def run(args) -> int:
    """Run the job of parsed ``args``; exit files are written whatever happens."""
    job_dir = Path(args.o)
    _start(job_dir)
    ok = False
    try:
        if args.relion_job == "pick":
            ok = relion_pick(args.o, args.in_mics, args.model, threshold=args.threshold, radius=args.radius,
                             margin=args.margin, j=args.j, workers=args.workers, scheduler=args.scheduler,
                             device=args.device, overwrite=args.overwrite)
        else:
            if not (args.in_coords or args.in_parts):
                raise PupickError("training needs --in_coords (a ManualPick job's coordinates) or --in_parts")
            extra = ["--device", args.device, "-q"]
            for flag in ("expected", "epochs", "steps"):
                if getattr(args, flag) is not None:
                    extra += [f"--{flag}", str(getattr(args, flag))]
            ok = relion_train(args.o, args.in_mics, radius=args.radius, in_coords=args.in_coords,
                              in_parts=args.in_parts, extra=extra, j=args.j)
    except (PupickError, FileNotFoundError, OSError) as exc:
        print(f"pupick relion {args.relion_job}: error: {exc}", file=sys.stderr)
    except Exception:  # RELION must see the failure: the traceback goes to run.err
        traceback.print_exc()
    finally:
        _finish(job_dir, ok)
    return 0 if ok else 1


def main(argv=None) -> int:
    """``pupick relion pick|train ...``."""
    parser = argparse.ArgumentParser(prog="pupick relion", description="RELION 5 External jobs")
    add_parsers(parser.add_subparsers(dest="job", metavar="JOB", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a parameter we do not know: RELION must still see the job fail
        if exc.code and "--o" in argv[:-1] and "-h" not in argv and "--help" not in argv:
            job_dir = Path(argv[argv.index("--o") + 1])
            _start(job_dir)
            _finish(job_dir, False)
        raise
    return run(args)


def pick_main(argv=None) -> int:
    """Console script ``pupick-relion-pick`` (the same as ``pupick relion pick``)."""
    return main(["pick", *(sys.argv[1:] if argv is None else argv)])


def train_main(argv=None) -> int:
    """Console script ``pupick-relion-train``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
