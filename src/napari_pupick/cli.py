"""``pupick``: the command line over the same core the napari plugin uses.

Every sub-command reads files, calls :mod:`napari_pupick.pipeline` (or the core) and writes files; nothing else.
Coordinates on the command line and in files are in ORIGINAL micrograph pixels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

EPILOG = """\
A typical session (binning, particle count, threshold and edge margin are chosen from the data and printed):
  pupick train micrographs/ --labels my_clicks.star --radius 30 -o model.pt
  pupick extract micrographs/ --model model.pt -o picks.star
  pupick evaluate picks.star --truth ground_truth.star --radius 15
  pupick convert picks.star picks_relion/ --per-micrograph
Run the whole loop on built-in synthetic data:  pupick demo
"""


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    g = p.add_argument_group("compute")
    if device:
        g.add_argument("--device", default="auto",
                       help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:1, mps [default: auto]")
    g.add_argument("--threads", type=int, default=None,
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
    parser = argparse.ArgumentParser(
        prog="pupick",
        description="Positive-unlabeled particle picking for cryo-EM micrographs (Topaz's method). "
        "Label a few particles, train, pick the rest.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from napari_pupick import __version__

    parser.add_argument("--version", action="version", version=f"napari-pupick {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    mic_help = "micrograph files (.mrc, .mrcs, .tif, .png, .jpg) or folders of them"

    p = sub.add_parser("normalize", help="downsample and normalize micrographs (writes MRC files)",
                       description="Downsample (Fourier cropping) and normalize micrographs; writes one MRC per "
                       "micrograph and preprocess.json with the fitted mixture, reusable at prediction.")
    p.add_argument("micrographs", nargs="+", help=mic_help)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--downsample", "-s", default=None, type=_downsample_arg,
                   help="integer binning factor, or auto (needs --radius) [default: auto with --radius, else 1]")
    p.add_argument("--radius", "-r", type=float, default=None,
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
    p.add_argument("--radius", "-r", type=float, required=True, help="particle radius in original pixels")
    p.add_argument("--downsample", "-s", default="auto", type=_downsample_arg,
                   help="integer binning factor, or auto: chosen from --radius so the particle radius is about "
                   "12 binned pixels [default: auto]")
    p.add_argument("--normalize", dest="method", choices=["gmm", "affine", "none"], default="gmm",
                   help="micrograph normalization [default: gmm]")
    p.add_argument("--expected", "-n", type=float, default=None,
                   help="expected particles per micrograph (sets the class prior pi) [default: estimated from the "
                   "data in a first training round, printed]")
    p.add_argument("--objective", choices=["ge-binomial", "ge-kl", "nnpu", "pn"], default="ge-binomial",
                   help="training objective [default: ge-binomial]")
    p.add_argument("--model", default="conv3", help="conv3 or resnet8 [default: conv3]")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--steps", type=int, default=None, help="minibatches per epoch")
    p.add_argument("--autoencoder", type=float, default=None,
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
    p.add_argument("--radius", "-r", type=float, default=None,
                   help="NMS radius in original pixels [default: the model's particle radius]")
    p.add_argument("--threshold", "-t", type=float, default=None,
                   help="logit threshold [default: the model's calibrated threshold, printed by pupick train]")
    p.add_argument("--all-candidates", action="store_true",
                   help="write every candidate down to logit -6 (to filter by score later) instead of the picks "
                   "above the threshold")
    p.add_argument("--margin", type=float, default=None,
                   help="drop picks this close to the edge, original px [default: the model's: one particle radius, "
                   "or less where labels lie closer to the border]")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average scores over four 90-degree rotations [default: as the model was calibrated, "
                   "which pupick train does with --tta]")
    p.add_argument("--per-micrograph", action="store_true",
                   help="one STAR file per micrograph in the output folder (RELION's coordinate import)")
    p.add_argument("--box-size", type=float, default=None, help="box size for .box output [default: 2 x radius]")
    p.add_argument("--format", choices=["star", "csv", "topaz", "box"], default=None,
                   help="format of the per-micrograph files [default: from --output's extension; star]")
    p.add_argument("--parts", default=None,
                   help="folder of the per-micrograph files written as each micrograph is done (the run resumes "
                   "from them) [default: <output stem>_per_micrograph beside --output]")
    p.add_argument("--overwrite", action="store_true",
                   help="redo micrographs whose output is already complete (same model, same settings)")
    p.add_argument("--workers", type=int, default=None,
                   help="pick on a dask.distributed LocalCluster of this many worker processes on this machine")
    p.add_argument("--scheduler", default=None,
                   help="dask.distributed scheduler address to join (many machines; see docs/cluster.md)")
    p.add_argument("--retries", type=int, default=2,
                   help="retries of a micrograph whose worker was lost (with --workers/--scheduler) [default: 2]")
    _add_common(p)

    p = sub.add_parser("evaluate", help="average precision of picks against reference coordinates",
                       description="Match picks to reference particles within a radius (each reference matched "
                       "once) and report average precision, precision at 90%% recall and the F2-optimal "
                       "threshold. Only micrographs present in the reference are evaluated.")
    p.add_argument("picks", help="picks with scores")
    p.add_argument("--truth", required=True, help="reference particle coordinates")
    p.add_argument("--radius", "-r", type=float, required=True, help="match radius in original pixels")
    p.add_argument("--json", help="also write the figures to this JSON file")

    p = sub.add_parser("convert", help="convert coordinates between STAR, CSV, Topaz .txt and EMAN .box",
                       description="Read coordinates in any known format and write them in another, optionally "
                       "keeping only picks with score >= --threshold.")
    p.add_argument("input", help="input coordinates (file, or folder of per-micrograph STAR files)")
    p.add_argument("output", help="output file, or folder with --per-micrograph")
    p.add_argument("--threshold", "-t", type=float, default=None, help="keep picks with score >= this")
    p.add_argument("--model", "-m", default=None,
                   help="keep picks at or above this model's calibrated threshold (instead of --threshold)")
    p.add_argument("--per-micrograph", action="store_true", help="one STAR file per micrograph")
    p.add_argument("--scale", type=float, default=1.0, help="multiply coordinates by this factor")
    p.add_argument("--box-size", type=float, default=None, help="box size for .box output")

    p = sub.add_parser("pretrain", help="pretrain a general starting model on varied synthetic micrographs",
                       description="Supervised pretraining on synthetic micrographs of varied particles, sizes, "
                       "crowding, SNR (0.01-0.3), quantized sources, carbon edges, ice and contamination. The "
                       "result can start training (pupick train --init FILE); the package ships one made this way.")
    p.add_argument("-o", "--output", required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--steps", type=int, default=3000, help="optimisation steps [default: 3000]")
    p.add_argument("--model", default="conv3", help="conv3 or resnet8 [default: conv3]")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per step [default: 16]")
    p.add_argument("--groups", type=int, default=12,
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
    p.add_argument("--micrographs", type=int, default=8, help="number of synthetic micrographs [default: 8]")
    p.add_argument("--labels", type=int, default=40, help="labelled particles [default: 40]")
    _add_common(p)
    return parser


def _threads(args) -> int:
    n = args.threads or int(os.environ.get("PUPICK_THREADS", "1") or 1)
    from napari_pupick.predict import set_threads

    set_threads(n)
    return n


def _read_micrographs(specs, quiet=False):
    from tqdm.auto import tqdm

    from napari_pupick.io import list_micrographs, micrograph_name, read_micrograph

    paths = list_micrographs(specs)
    images = [read_micrograph(p) for p in tqdm(paths, desc="read", unit="mic", disable=quiet)]
    return paths, [micrograph_name(p) for p in paths], images


def cmd_normalize(args) -> int:
    from tqdm.auto import tqdm

    from napari_pupick.io import list_micrographs, micrograph_name, read_micrograph, write_micrograph
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
    elif factor == "auto":
        print("pupick normalize: error: --downsample auto needs --radius", file=sys.stderr)
        return 2
    pre = Preprocessor(downsample=factor or 1, method=args.method)
    # one pass over the files: each is read and binned as it comes, the mixture is fit on the binned images
    reading = (read_micrograph(p) for p in tqdm(paths, desc="read and bin", unit="mic", disable=args.quiet))
    normalized = pre.fit_transform(reading)
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
    ckpt = train_picker(images, names, labels, radius=args.radius, downsample=binning.factor, pixel_size=pixel_size,
                        normalization=args.method, expected_particles=args.expected, negatives=negatives,
                        init=init, tta=args.tta, progress=not args.quiet, log=print, **config)
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
    return 0 if result.ok else 1


def cmd_evaluate(args) -> int:
    from napari_pupick.io import read_coordinates
    from napari_pupick.metrics import evaluate

    picks = read_coordinates(args.picks)
    truth = read_coordinates(args.truth)
    names = set(truth["micrograph"])
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

        if threshold is not None:
            print("pupick convert: error: give --threshold or --model, not both", file=sys.stderr)
            return 2
        t = (Checkpoint.load(args.model).metrics or {}).get("threshold")
        if t is None:
            print(f"pupick convert: error: {args.model} has no calibrated threshold (trained before calibration was "
                  f"added): give --threshold", file=sys.stderr)
            return 2
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
    """Entry point of ``pupick`` and ``python -m napari_pupick``."""
    from napari_pupick.errors import PupickError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["relion"]:  # RELION's External job: exit files are written even for bad arguments
        from napari_pupick.relion import main as relion_main

        return relion_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (PupickError, FileNotFoundError) as exc:
        print(f"pupick {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pupick {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
