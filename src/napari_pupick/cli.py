"""``pupick``: the command line over the same core the napari plugin uses.

Every sub-command reads files, calls :mod:`napari_pupick.pipeline` (or the core) and writes files; nothing else.
Coordinates on the command line and in files are in ORIGINAL micrograph pixels.

Errors: every error is one line on stderr, ``pupick COMMAND: error: WHAT``, naming the file or flag and the
problem; exit status 2 for bad usage (an argument that cannot be used, found before any file is read), 1 for a
failure (a file that cannot be read or written, a training that cannot run), 130 for Ctrl-C. ``--debug`` (anywhere
on the command line) lets the Python traceback through instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from napari_pupick.errors import PupickError, TrainingError, UsageError, WriteError

__all__ = ["main", "build_parser"]

EPILOG = """\
A typical session (binning, particle count, threshold and edge margin are chosen from the data and printed):
  pupick train micrographs/ --labels my_clicks.star --radius 30 -o model.pt
  pupick extract micrographs/ --model model.pt -o picks.star
  pupick evaluate picks.star --truth ground_truth.star --radius 15
  pupick convert picks.star picks_relion/ --per-micrograph
Run the whole loop on built-in synthetic data:  pupick demo
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def _number(kind=float, minimum=None, strict=False):
    """An argparse type: a finite number (an integer for ``kind=int``), at least (above, ``strict``) ``minimum``."""

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if minimum is not None and (value < minimum or (strict and value == minimum)):
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {minimum:g}, not {text}")
        return value

    return parse


POSITIVE = _number(float, 0, strict=True)
NON_NEGATIVE = _number(float, 0)
FINITE = _number(float)
COUNT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    g = p.add_argument_group("compute")
    if device:
        g.add_argument("--device", default="auto",
                       help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:1, mps [default: auto]")
    g.add_argument("--threads", type=COUNT, default=None,
                   help="CPU threads for torch [default: $PUPICK_THREADS or 1 per process]")
    g.add_argument("--seed", type=int, default=0, help="random seed [default: 0]")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _downsample_arg(text: str):
    from napari_pupick.calibration import parse_downsample

    try:
        return parse_downsample(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pupick",
        description="Positive-unlabeled particle picking for cryo-EM micrographs (Topaz's method). "
        "Label a few particles, train, pick the rest.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from napari_pupick import __version__

    parser.add_argument("--version", action="version", version=f"napari-pupick {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (accepted anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    mic_help = "micrograph files (.mrc, .mrcs, .tif, .png, .jpg) or folders of them"

    p = sub.add_parser("normalize", help="downsample and normalize micrographs (writes MRC files)",
                       description="Downsample (Fourier cropping) and normalize micrographs; writes one MRC per "
                       "micrograph and preprocess.json with the fitted mixture, reusable at prediction.")
    p.add_argument("micrographs", nargs="+", help=mic_help)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--downsample", "-s", default=None, type=_downsample_arg,
                   help="integer binning factor, or auto (needs --radius) [default: auto with --radius, else 1]")
    p.add_argument("--radius", "-r", type=POSITIVE, default=None,
                   help="particle radius in original pixels (chooses the binning as pupick train does)")
    p.add_argument("--method", choices=["gmm", "affine", "none"], default="gmm",
                   help="gmm: two-component mixture shared by all micrographs (carbon vs ice); "
                   "affine: (x - mean) / std [default: gmm]")
    _add_common(p, device=False)

    p = sub.add_parser("train", help="train a picker from a few labelled particles",
                       description="Train a positive-unlabeled CNN from sparse particle labels. Every micrograph "
                       "given contributes unlabeled regions; labelled ones also positives.")
    p.add_argument("micrographs", nargs="+", help=mic_help)
    p.add_argument("--labels", "-l", required=True,
                   help="coordinates of labelled particles (.star, .csv, Topaz .txt, .box, or a folder of "
                   "per-micrograph .star files)")
    p.add_argument("--negatives", help="coordinates of rejected picks (explicit negatives), same formats")
    p.add_argument("--radius", "-r", type=POSITIVE, required=True, help="particle radius in original pixels")
    p.add_argument("--downsample", "-s", default="auto", type=_downsample_arg,
                   help="integer binning factor, or auto: chosen from --radius so the particle radius is about "
                   "12 binned pixels [default: auto]")
    p.add_argument("--normalize", dest="method", choices=["gmm", "affine", "none"], default="gmm",
                   help="micrograph normalization [default: gmm]")
    p.add_argument("--expected", "-n", type=POSITIVE, default=None,
                   help="expected particles per micrograph (sets the class prior pi) [default: estimated from the "
                   "data in a first training round, printed]")
    p.add_argument("--objective", choices=["ge-binomial", "ge-kl", "nnpu", "pn"], default="ge-binomial",
                   help="training objective [default: ge-binomial]")
    p.add_argument("--model", default="conv3", help="conv3 or resnet8 [default: conv3]")
    p.add_argument("--epochs", type=COUNT, default=None, help="training epochs")
    p.add_argument("--steps", type=COUNT, default=None, help="minibatches per epoch")
    p.add_argument("--autoencoder", type=NON_NEGATIVE, default=None,
                   help="autoencoder regularization weight gamma (0 = off; helps below ~250 labels)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="calibrate (and later pick) on scores averaged over four 90-degree rotations: better picks "
                   "on noisy data, 4x the scoring time [default: --tta]")
    p.add_argument("--init", default="default",
                   help="where training starts: a checkpoint file, general (the general starting model shipped "
                   "with napari-pupick) or none (a random start) [default: general when the model is conv3]")
    p.add_argument("-o", "--output", required=True, help="checkpoint file to write (.pt)")
    _add_common(p)

    p = sub.add_parser("extract", help="pick particles with a trained model",
                       description="Score micrographs with a trained model and extract picks by non-maximum "
                       "suppression. Writes every pick above --threshold with its score (a logit): filter by "
                       "score later (pupick convert --threshold).")
    p.add_argument("micrographs", nargs="+", help=mic_help)
    p.add_argument("--model", "-m", required=True, help="checkpoint from pupick train")
    p.add_argument("-o", "--output", required=True,
                   help="output coordinates (.star, .csv, .txt, .box) or a folder with --per-micrograph")
    p.add_argument("--radius", "-r", type=POSITIVE, default=None,
                   help="NMS radius in original pixels [default: the model's particle radius]")
    p.add_argument("--threshold", "-t", type=FINITE, default=None,
                   help="logit threshold [default: the model's calibrated threshold, printed by pupick train]")
    p.add_argument("--all-candidates", action="store_true",
                   help="write every candidate down to logit -6 (to filter by score later) instead of the picks "
                   "above the threshold")
    p.add_argument("--margin", type=NON_NEGATIVE, default=None,
                   help="drop picks this close to the edge, original px [default: the model's: one particle radius, "
                   "or less where labels lie closer to the border]")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average scores over four 90-degree rotations [default: as the model was calibrated, "
                   "which pupick train does with --tta]")
    p.add_argument("--per-micrograph", action="store_true",
                   help="one STAR file per micrograph in the output folder (RELION's coordinate import)")
    p.add_argument("--box-size", type=POSITIVE, default=None,
                   help="box size for .box output [default: 2 x radius]")
    p.add_argument("--format", choices=["star", "csv", "topaz", "box"], default=None,
                   help="format of the per-micrograph files [default: from --output's extension; star]")
    p.add_argument("--parts", default=None,
                   help="folder of the per-micrograph files written as each micrograph is done (the run resumes "
                   "from them) [default: <output stem>_per_micrograph beside --output]")
    p.add_argument("--overwrite", action="store_true",
                   help="redo micrographs whose output is already complete (same model, same settings)")
    p.add_argument("--workers", type=COUNT, default=None,
                   help="pick on a dask.distributed LocalCluster of this many worker processes on this machine")
    p.add_argument("--scheduler", default=None,
                   help="dask.distributed scheduler address to join (many machines; see docs/cluster.md)")
    p.add_argument("--retries", type=NON_NEGATIVE_INT, default=2,
                   help="retries of a micrograph whose worker was lost (with --workers/--scheduler) [default: 2]")
    _add_common(p)

    p = sub.add_parser("evaluate", help="average precision of picks against reference coordinates",
                       description="Match picks to reference particles within a radius (each reference matched "
                       "once) and report average precision, precision at 90%% recall and the F2-optimal "
                       "threshold. Only micrographs present in the reference are evaluated.")
    p.add_argument("picks", help="picks with scores")
    p.add_argument("--truth", required=True, help="reference particle coordinates")
    p.add_argument("--radius", "-r", type=POSITIVE, required=True, help="match radius in original pixels")
    p.add_argument("--json", help="also write the figures to this JSON file")

    p = sub.add_parser("convert", help="convert coordinates between STAR, CSV, Topaz .txt and EMAN .box",
                       description="Read coordinates in any known format and write them in another, optionally "
                       "keeping only picks with score >= --threshold.")
    p.add_argument("input", help="input coordinates (file, or folder of per-micrograph STAR files)")
    p.add_argument("output", help="output file, or folder with --per-micrograph")
    p.add_argument("--threshold", "-t", type=FINITE, default=None, help="keep picks with score >= this")
    p.add_argument("--model", "-m", default=None,
                   help="keep picks at or above this model's calibrated threshold (instead of --threshold)")
    p.add_argument("--per-micrograph", action="store_true", help="one STAR file per micrograph")
    p.add_argument("--scale", type=POSITIVE, default=1.0, help="multiply coordinates by this factor")
    p.add_argument("--box-size", type=POSITIVE, default=None, help="box size for .box output")

    p = sub.add_parser("pretrain", help="pretrain a general starting model on varied synthetic micrographs",
                       description="Supervised pretraining on synthetic micrographs of varied particles, sizes, "
                       "crowding, SNR (0.01-0.3), quantized sources, carbon edges, ice and contamination. The "
                       "result can start training (pupick train --init FILE); the package ships one made this way.")
    p.add_argument("-o", "--output", required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--steps", type=COUNT, default=3000, help="optimisation steps [default: 3000]")
    p.add_argument("--model", default="conv3", help="conv3 or resnet8 [default: conv3]")
    p.add_argument("--batch-size", type=COUNT, default=16, help="tiles per step [default: 16]")
    p.add_argument("--groups", type=COUNT, default=12,
                   help="synthetic groups (each with its own conditions) in the pool [default: 12]")
    _add_common(p)

    p = sub.add_parser("relion", help="RELION 5 External jobs: pick, train (docs/relion.md)",
                       description="Entry points for RELION's External job type: pupick relion pick --o JOB "
                       "--in_mics MICS.star --model M.pt; pupick relion train --o JOB --in_mics MICS.star "
                       "--in_coords manualpick.star --radius R. See docs/relion.md.")
    from napari_pupick.relion import add_parsers

    add_parsers(p.add_subparsers(dest="relion_job", metavar="JOB", required=True))

    p = sub.add_parser("demo", help="run the whole loop headless on synthetic sample data",
                       description="Make synthetic micrographs, take sparse labels, train, extract, evaluate, "
                       "and write STAR files and a PNG of the picks.")
    p.add_argument("-o", "--output", default="demo_out", help="output folder [default: demo_out]")
    p.add_argument("--micrographs", type=COUNT, default=8, help="number of synthetic micrographs [default: 8]")
    p.add_argument("--labels", type=COUNT, default=40, help="labelled particles [default: 40]")
    _add_common(p)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Checks of the arguments, before any file is read


def _writable_folder(folder: Path, flag: str, target: Path) -> None:
    """The nearest existing folder at or above ``folder`` must be a folder we can create files in."""
    from napari_pupick.io.atomic import temp_path

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {target}: {existing} is a file, not a folder")
    try:
        temp_path(existing / ".pupick-write-test").unlink()
    except OSError as exc:
        raise WriteError(f"{flag} {target}: cannot write into {existing} ({exc.strerror or exc})") from None


def _output_file(path, flag: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {target}: is a folder; give a file name")
    _writable_folder(target.parent, flag, target)


def _output_folder(path, flag: str) -> None:
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {target}: exists and is not a folder")
    _writable_folder(target, flag, target)


def _input(path, flag: str) -> None:
    if not Path(path).exists():
        raise UsageError(f"{flag} {path}: no such file or folder")


def _model_file(path, flag: str) -> None:
    from napari_pupick.training import checkpoint_problem

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p}: is a folder, not a model checkpoint")
    if not p.is_file():
        raise UsageError(f"{flag} {p}: no such file")
    why = checkpoint_problem(p)
    if why:
        raise UsageError(f"{flag} {p}: not a napari-pupick checkpoint ({why}); give the .pt file pupick train wrote")


def _check_distributed(args) -> None:
    if getattr(args, "workers", None) or getattr(args, "scheduler", None):
        from napari_pupick.batch import have_distributed, require_distributed

        if not have_distributed():
            try:
                require_distributed()
            except PupickError as exc:
                raise UsageError(str(exc)) from None


def _check_args(args) -> None:
    """Refuse arguments that cannot work (UsageError, exit 2; WriteError for an unwritable output, exit 1)."""
    cmd = args.command
    if cmd == "normalize":
        if args.downsample == "auto" and args.radius is None:
            raise UsageError("--downsample auto needs --radius")
        _output_folder(args.output, "-o")
    elif cmd == "train":
        _input(args.labels, "--labels")
        if args.negatives:
            _input(args.negatives, "--negatives")
        if args.init not in ("default", "general", "none"):
            _model_file(args.init, "--init")
        _output_file(args.output, "-o")
    elif cmd == "extract":
        _model_file(args.model, "--model")
        _check_distributed(args)
        if args.per_micrograph:
            _output_folder(args.output, "-o")
        else:
            _output_file(args.output, "-o")
        if args.parts:
            _output_folder(args.parts, "--parts")
    elif cmd == "evaluate":
        _input(args.picks, "picks")
        _input(args.truth, "--truth")
        if args.json:
            _output_file(args.json, "--json")
    elif cmd == "convert":
        _input(args.input, "input")
        if args.model is not None:
            if args.threshold is not None:
                raise UsageError("give --threshold or --model, not both")
            _model_file(args.model, "--model")
        if args.per_micrograph:
            _output_folder(args.output, "output")
        else:
            _output_file(args.output, "output")
    elif cmd == "pretrain":
        _output_file(args.output, "-o")
    elif cmd == "demo":
        _output_folder(args.output, "-o")


def _read_checked(path):
    """A micrograph that can be used: not blank (a blank one cannot be normalized or picked)."""
    from napari_pupick.errors import MicrographError
    from napari_pupick.io import read_micrograph

    image = read_micrograph(path)
    if image.size and float(image.min()) == float(image.max()):
        raise MicrographError(f"{path}: the micrograph is blank (every pixel is {float(image.min()):g}); remove it")
    return image


def _threads(args) -> int:
    n = args.threads or int(os.environ.get("PUPICK_THREADS", "1") or 1)
    from napari_pupick.predict import set_threads

    set_threads(n)
    return n


def _read_micrographs(specs, quiet=False):
    from tqdm.auto import tqdm

    from napari_pupick.io import list_micrographs, micrograph_name

    paths = list_micrographs(specs)
    images = [_read_checked(p) for p in tqdm(paths, desc="read", unit="mic", disable=quiet)]
    return paths, [micrograph_name(p) for p in paths], images


def cmd_normalize(args) -> int:
    from tqdm.auto import tqdm

    from napari_pupick.io import list_micrographs, micrograph_name, write_micrograph
    from napari_pupick.io.atomic import write_json
    from napari_pupick.preprocess import Preprocessor

    paths = list_micrographs(args.micrographs)
    names = [micrograph_name(p) for p in paths]
    factor = args.downsample
    if args.radius is not None:
        from napari_pupick.calibration import choose_downsample

        binning = choose_downsample(args.radius, None, factor or "auto")
        factor = binning.factor
        print(binning.describe())
        if binning.warning:
            print(f"warning: {binning.warning}", file=sys.stderr)
    pre = Preprocessor(downsample=factor or 1, method=args.method)
    # one pass over the files: each is read and binned as it comes, the mixture is fit on the binned images
    with tqdm(paths, desc="read and bin", unit="mic", disable=args.quiet) as bar:  # closed before an error prints
        normalized = pre.fit_transform(_read_checked(p) for p in bar)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, image in tqdm(list(zip(names, normalized)), desc="write", unit="mic", disable=args.quiet):
        write_micrograph(out / f"{name}.mrc", image)
    write_json(out / "preprocess.json", pre.to_dict())
    print(f"wrote {len(names)} normalized micrographs and preprocess.json to {out}")
    return 0


def cmd_train(args) -> int:
    from napari_pupick.calibration import choose_downsample
    from napari_pupick.io import micrograph_info, read_coordinates
    from napari_pupick.pipeline import resolve_init, train_picker

    init = resolve_init(args.init, args.model)  # a bad --init fails before any micrograph is read
    _threads(args)
    paths, names, images = _read_micrographs(args.micrographs, args.quiet)
    labels = read_coordinates(args.labels)
    negatives = read_coordinates(args.negatives) if args.negatives else None
    pixel_size = micrograph_info(paths[0])["pixel_size"] or None
    binning = choose_downsample(args.radius, pixel_size, args.downsample)
    print(binning.describe())
    if binning.warning:
        print(f"warning: {binning.warning}", file=sys.stderr)
    config = {k: v for k, v in dict(model=args.model, objective=args.objective, epochs=args.epochs,
                                      steps_per_epoch=args.steps, autoencoder=args.autoencoder,
                                      seed=args.seed, device=args.device).items() if v is not None}
    t0 = time.perf_counter()
    try:
        ckpt = train_picker(images, names, labels, radius=args.radius, downsample=binning.factor,
                            pixel_size=pixel_size, normalization=args.method, expected_particles=args.expected,
                            negatives=negatives, init=init, tta=args.tta, progress=not args.quiet, log=print,
                            **config)
    except TrainingError as exc:
        if getattr(exc, "checkpoint", None) is None:
            raise
        exc.checkpoint.save(args.output)  # the last good weights, calibrated: better than nothing, but a failure
        print(f"pupick train: error: {exc}; wrote those weights to {args.output}", file=sys.stderr)
        return 1
    ckpt.save(args.output)
    m = ckpt.metrics or {}
    print(f"trained in {time.perf_counter() - t0:.1f} s; wrote {args.output}")
    if m.get("threshold") is not None:
        count = m.get("expected_particles")
        how = m.get("expected_source", "estimated")
        print(f"default threshold {m['threshold']:.2f} (used by pupick extract); particles per micrograph "
              f"{count:.0f} ({how}); edge margin {m.get('margin', binning.radius):g} px")
    return 0


def cmd_extract(args) -> int:
    from napari_pupick.batch import close_client, run_batch, start_client
    from napari_pupick.io import list_micrographs
    from napari_pupick.pipeline import ALL_CANDIDATES

    threads = _threads(args)
    paths = list_micrographs(args.micrographs)
    out = Path(args.output)
    if args.per_micrograph:
        folder, combined, fmt = out, None, (args.format or "star")
    else:
        from napari_pupick.io import guess_format

        fmt = args.format or guess_format(out)
        folder = Path(args.parts) if args.parts else out.with_name(f"{out.stem}_per_micrograph")
        combined = None if fmt == "box" else out
        if fmt == "box" and not args.parts:
            folder = out.with_name(out.stem)
    client = None
    if args.workers or args.scheduler:
        client = start_client(args.workers, args.scheduler)
    try:
        result = run_batch(Path(args.model).resolve(), paths, folder, combined=combined, format=fmt,
                           threshold=ALL_CANDIDATES if args.all_candidates else args.threshold, radius=args.radius,
                           margin=args.margin, tta=args.tta, box_size=args.box_size, overwrite=args.overwrite,
                           device=args.device, threads=threads, client=client, retries=args.retries,
                           progress=not args.quiet)
    finally:
        if client is not None:
            close_client(client)
    print(result.summary())
    where = f"{combined} and {folder}/" if combined is not None else f"{folder}/"
    print(f"picks of {len(result.done) + len(result.skipped)} of {len(paths)} micrographs in {where}")
    if not result.ok:
        path, reason = result.failed[0]
        more = f" (and {len(result.failed) - 1} more, listed above)" if len(result.failed) > 1 else ""
        print(f"pupick extract: error: {len(result.failed)} of {len(paths)} micrograph(s) failed: {path}: "
              f"{' '.join(str(reason).split())}{more}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from napari_pupick.io import read_coordinates
    from napari_pupick.metrics import evaluate

    from napari_pupick.errors import CoordinateError

    picks = read_coordinates(args.picks)
    truth = read_coordinates(args.truth)
    names = set(truth["micrograph"])
    if len(picks) and not picks["micrograph"].isin(names).any():
        def some(values):
            values = sorted(set(map(str, values)))
            return ", ".join(values[:3]) + (f" and {len(values) - 3} more" if len(values) > 3 else "")

        raise CoordinateError(f"{args.picks} and {args.truth} have no micrograph in common (picks: {some(picks['micrograph'])}; "
                              f"truth: {some(names)}): nothing to evaluate")
    picks = picks[picks["micrograph"].isin(names)]
    if picks["score"].isna().all():
        picks = picks.assign(score=0.0)
    result = evaluate(picks, truth, args.radius)
    result = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in result.items()}
    for k, v in result.items():
        print(f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}")
    if args.json:
        from napari_pupick.io.atomic import write_json

        write_json(args.json, result)
    return 0


def cmd_convert(args) -> int:
    from napari_pupick.io import read_coordinates, write_coordinates

    table = read_coordinates(args.input)
    threshold = args.threshold
    if args.model is not None:
        from napari_pupick.training import Checkpoint

        t = (Checkpoint.load(args.model).metrics or {}).get("threshold")
        if t is None:
            raise UsageError(f"--model {args.model}: has no calibrated threshold (trained before calibration was "
                             f"added): give --threshold")
        threshold = float(t)
        print(f"threshold {threshold:.2f} from {args.model}")
    if threshold is not None:
        table = table[table["score"] >= threshold]
    if args.scale != 1.0:
        table = table.assign(x=table["x"] * args.scale, y=table["y"] * args.scale)
    write_coordinates(table, args.output, per_micrograph=args.per_micrograph, box_size=args.box_size)
    print(f"{len(table)} coordinates -> {args.output}")
    return 0


def cmd_pretrain(args) -> int:
    from tqdm.auto import tqdm

    from napari_pupick.pretrain import pretrain_run

    threads = _threads(args)
    bar = None
    t0 = time.perf_counter()
    for ev in pretrain_run(steps=args.steps, seed=args.seed, model=args.model, batch_size=args.batch_size,
                           groups=args.groups, threads=threads, device=args.device, output=args.output):
        if ev.kind == "step" and not args.quiet:
            if bar is None:
                bar = tqdm(total=ev.total_steps, desc="pretrain", unit="step")
            bar.update(1)
            bar.set_postfix(loss=f"{ev.losses['loss']:.3g}", refresh=False)
        elif ev.kind != "step":
            if bar is not None:
                bar.close()
                bar = None
            print(ev.message)
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_demo(args) -> int:
    from napari_pupick.demo import run_demo

    _threads(args)
    run_demo(args.output, n_micrographs=args.micrographs, n_labels=args.labels, seed=args.seed,
             device=args.device, progress=not args.quiet)
    return 0


COMMANDS = {
    "normalize": cmd_normalize,
    "train": cmd_train,
    "extract": cmd_extract,
    "evaluate": cmd_evaluate,
    "convert": cmd_convert,
    "pretrain": cmd_pretrain,
    "demo": cmd_demo,
}


def main(argv=None) -> int:
    """Entry point of ``pupick`` and ``python -m napari_pupick`` (exit status: see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["relion"]:  # RELION's External job: exit files are written even for bad arguments
        from napari_pupick.relion import main as relion_main

        return relion_main(argv[1:])
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)  # bad usage: one line, SystemExit(2)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    name = f"pupick {args.command}"
    try:
        _check_args(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, (PupickError, OSError)):
            message = str(exc) or type(exc).__name__
        else:  # a bug: say so in one line; --debug shows where
            message = f"internal error ({type(exc).__name__}: {exc}); run again with --debug for the traceback"
        print(f"{name}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
