"""Run Topaz 0.3.20 stage by stage as external programs and measure every stage (benchmark peer only).

Topaz is GPL and lives in its own venv (``setup_topaz.sh``); nothing of it is imported here. Each stage is one
``topaz`` process launched through ``topaz_shim.py``; its wall time, CPU time (user + system) and peak resident
memory come from ``os.wait4`` on that very process, and every line it prints is time-stamped, so per-micrograph
times and per-epoch training progress come out of Topaz's own progress lines.

Stages, for a dataset from ``benchmarks/common.py``:

1. ``preprocess``: ``topaz preprocess -s <downsample>`` (Fourier binning + Topaz's GMM normalization) of every
   micrograph of the dataset.
2. ``train``: ``topaz train`` on the training micrographs with the sparse labels (scaled to binned pixels),
   watching the ``valid`` (else held-out) micrographs with all their particles as Topaz's test set.
3. ``score``: ``topaz segment`` of the held-out micrographs (the per-pixel logit maps).
4. ``extract``: ``topaz extract -m none`` on those maps (non-maximum suppression, radius = binned particle
   radius, threshold -6, coordinates scaled up by the downsampling factor).
5. evaluation of the picks against ALL particles of the held-out micrographs with ``napari_pupick.metrics``.

>>> from benchmarks.common import get_dataset                                                   # doctest: +SKIP
>>> result = run_topaz_pipeline(get_dataset("apoferritin"), "/tmp/tz", pretrained=False)      # doctest: +SKIP

Command line::

    .venv/bin/python benchmarks/topaz/run_topaz.py apoferritin --out /work/bench_out/topaz \\
        --variants scratch,pretrained
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import Dataset, get_dataset  # noqa: E402

__all__ = [
    "topaz_python",
    "topaz_command",
    "thread_env",
    "run_measured",
    "preprocess",
    "write_training_inputs",
    "train",
    "score",
    "extract",
    "read_picks",
    "evaluate_picks",
    "run_topaz_pipeline",
    "DEFAULT_SCHEDULE",
]

# The schedule used on the 2-core benchmark machine: 300 steps of 256 regions. Topaz's own default (10 epochs x 1000
# steps) would take hours here; 6 x 100 steps took 1,050 s of CPU (1,600 s wall on the shared machine), 3 x 100
# about half that, which keeps one Topaz run near 10 minutes.
DEFAULT_SCHEDULE = dict(epochs=3, epoch_size=100, minibatch_size=256)


# ---------------------------------------------------------------------------------------------------------------
# launching and measuring


def topaz_python() -> Path:
    """The Topaz venv's python: ``$TOPAZ_VENV/bin/python``, default ``benchmarks/.topaz-venv``."""
    venv = Path(os.environ.get("TOPAZ_VENV", BENCH / ".topaz-venv"))
    python = venv / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"{python}: Topaz venv not found; run benchmarks/topaz/setup_topaz.sh first")
    return python


def topaz_command(*args) -> list:
    """The argv that runs ``topaz <args>`` through the shim."""
    return [str(topaz_python()), str(HERE / "topaz_shim.py"), *[str(a) for a in args]]


def thread_env(threads: int = 1) -> dict:
    """This process's environment with every thread pool limited to ``threads`` and unbuffered output."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[key] = str(int(threads))
    env["PYTHONUNBUFFERED"] = "1"  # time-stamp Topaz's progress lines as they are printed
    return env


def _reader(stream, name, t0, lines, sink):
    for text in iter(stream.readline, ""):
        t = time.perf_counter() - t0
        lines.append((t, name, text.rstrip("\n")))
        if sink is not None:
            sink.write(f"{t:9.3f} {name} {text}")
    stream.close()


def run_measured(cmd, threads: int = 1, log_path=None, cwd=None, check: bool = True) -> dict:
    """Run ``cmd`` and measure it.

    Returns a dict: ``wall_s``, ``cpu_s`` (user + system of that process and its reaped children), ``user_s``,
    ``sys_s``, ``peak_rss_mb`` (its maximum resident set size), ``returncode``, ``cmd`` and ``lines``: every
    output line as ``(seconds since start, 'out' | 'err', text)``.
    """
    sink = open(log_path, "w", buffering=1) if log_path else None
    try:
        if sink is not None:
            sink.write("# " + " ".join(map(str, cmd)) + "\n")
        lines: list = []
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                env=thread_env(threads), cwd=cwd)
        readers = [threading.Thread(target=_reader, args=(proc.stdout, "out", t0, lines, sink), daemon=True),
                   threading.Thread(target=_reader, args=(proc.stderr, "err", t0, lines, sink), daemon=True)]
        for r in readers:
            r.start()
        loads, stop = [], threading.Event()
        monitor = threading.Thread(target=_sample_load, args=(loads, stop), daemon=True)
        monitor.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        monitor.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        for r in readers:
            r.join()
    finally:
        if sink is not None:
            sink.close()
    lines.sort(key=lambda item: item[0])
    result = dict(cmd=[str(c) for c in cmd], returncode=proc.returncode, wall_s=wall,
                  cpu_s=usage.ru_utime + usage.ru_stime, user_s=usage.ru_utime, sys_s=usage.ru_stime,
                  peak_rss_mb=usage.ru_maxrss / 1024.0, threads=int(threads),
                  cpu_share=(usage.ru_utime + usage.ru_stime) / wall if wall > 0 else None,
                  load_avg_1min=float(np.mean(loads)) if loads else None, lines=lines)
    if check and proc.returncode != 0:
        tail = "\n".join(text for _, _, text in lines[-25:])
        raise RuntimeError(f"topaz failed (exit {proc.returncode}): {' '.join(result['cmd'])}\n{tail}")
    return result


def _sample_load(loads: list, stop: threading.Event, every: float = 5.0):
    """Sample the 1-minute load average every ``every`` seconds (a record of how busy the machine was)."""
    loads.append(os.getloadavg()[0])
    while not stop.wait(every):
        loads.append(os.getloadavg()[0])


def _per_item(result: dict, marker: str, n: int) -> dict:
    """Per-micrograph times from the time stamps of the progress lines containing ``marker``.

    The first interval runs from the process start (it carries the start-up: imports, model loading); the
    median over all intervals is the steady per-micrograph time.
    """
    stamps = [t for t, _, text in result["lines"] if marker in text]
    intervals = np.diff([0.0] + stamps).tolist()
    out = dict(n_micrographs=n, wall_per_micrograph_s=result["wall_s"] / max(n, 1),
               cpu_per_micrograph_s=result["cpu_s"] / max(n, 1), n_progress_lines=len(stamps))
    if intervals:
        out.update(median_wall_per_micrograph_s=float(statistics.median(intervals)),
                   first_item_s=float(intervals[0]),
                   intervals_s=[round(x, 3) for x in intervals])
    return out


def _summary(result: dict, **extra) -> dict:
    keep = {k: result[k] for k in ("wall_s", "cpu_s", "user_s", "sys_s", "peak_rss_mb", "threads", "cpu_share",
                                   "load_avg_1min", "cmd")}
    keep.update(extra)
    return keep


# ---------------------------------------------------------------------------------------------------------------
# stages


def preprocess(dataset: Dataset, workdir, threads: int = 1, names=None) -> dict:
    """``topaz preprocess -s <downsample>`` of ``names`` (default: every micrograph) into ``workdir/preprocessed``.

    Returns the stage measurement (``wall_s, cpu_s, peak_rss_mb, n_micrographs``, per-micrograph times) and
    ``destdir``.
    """
    names = list(dataset.names if names is None else names)
    dest = Path(workdir) / "preprocessed"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = topaz_command("preprocess", "-s", dataset.downsample, "-d", -1, "-t", 0, "-j", threads, "-v",
                        "-o", dest, *dataset.micrograph_paths(names))
    res = run_measured(cmd, threads, log_path=Path(workdir) / "preprocess.log")
    missing = [n for n in names if not (dest / f"{n}.mrc").is_file()]
    if missing:
        raise RuntimeError(f"topaz preprocess wrote no output for {missing[:3]} in {dest}")
    return _summary(res, destdir=str(dest), **_per_item(res, "# processed:", len(names)))


def _binned(table: pd.DataFrame, factor: int, shapes: dict | None = None) -> pd.DataFrame:
    """Topaz coordinate table on the binned grid: x_binned = round(x / factor).

    ``shapes`` maps micrograph name to the binned (rows, columns); coordinates are clipped into it (Topaz's
    training crashes on a coordinate one past the edge, which rounding can produce).
    """
    x = np.round(table["x"].to_numpy(float) / factor).astype(int)
    y = np.round(table["y"].to_numpy(float) / factor).astype(int)
    names = table["micrograph"].astype(str).to_numpy()
    if shapes:
        rows = np.array([shapes[n][0] for n in names], dtype=int)
        cols = np.array([shapes[n][1] for n in names], dtype=int)
        x, y = np.clip(x, 0, cols - 1), np.clip(y, 0, rows - 1)
    return pd.DataFrame({"image_name": names, "x_coord": x, "y_coord": y})


def _mrc_shape(path) -> tuple:
    import mrcfile

    with mrcfile.open(path, header_only=True, permissive=True) as mrc:
        return int(mrc.header.ny), int(mrc.header.nx)


def write_training_inputs(dataset: Dataset, workdir, preprocessed_dir, labels: pd.DataFrame | None = None) -> dict:
    """Write Topaz's training inputs: image lists (``image_name<TAB>path``) and binned coordinate files.

    Train targets are the sparse labels; test targets are ALL particles of the watched micrographs
    (``dataset.watch``: valid if any, else held-out). Returns the four paths.
    """
    workdir = Path(workdir)
    pre = Path(preprocessed_dir)
    labels = dataset.labels() if labels is None else labels
    paths = {}
    for key, names in (("train", dataset.train), ("test", dataset.watch)):
        listing = pd.DataFrame({"image_name": list(names), "path": [str(pre / f"{n}.mrc") for n in names]})
        paths[f"{key}_images"] = workdir / f"{key}_images.txt"
        listing.to_csv(paths[f"{key}_images"], sep="\t", index=False)
    shapes = {n: _mrc_shape(pre / f"{n}.mrc") for n in list(dataset.train) + list(dataset.watch)}
    paths["train_targets"] = workdir / "train_targets.txt"
    _binned(labels, dataset.downsample, shapes).to_csv(paths["train_targets"], sep="\t", index=False)
    paths["test_targets"] = workdir / "test_targets.txt"
    _binned(dataset.particles(dataset.watch), dataset.downsample, shapes).to_csv(
        paths["test_targets"], sep="\t", index=False)
    return {k: str(v) for k, v in paths.items()}


def _parse_training(lines) -> dict:
    """Topaz's train/test curve from its stdout: header ``epoch iter split <metrics> auprc``."""
    header, steps, tests = None, [], []
    for t, name, text in lines:
        if name != "out":
            continue
        fields = text.split("\t")
        if fields[:3] == ["epoch", "iter", "split"]:
            header = fields
            continue
        if header is None or len(fields) != len(header) or fields[2] not in ("train", "test"):
            continue
        row = {"t": t}
        for key, value in zip(header, fields):
            if key == "split":
                row[key] = value
                continue
            try:
                row[key] = float(value)
            except ValueError:
                row[key] = None
        (steps if row["split"] == "train" else tests).append(row)
    return dict(header=header, steps=steps, tests=tests)


def train(dataset: Dataset, workdir, inputs: dict, threads: int = 1, pretrained: bool = False,
          epochs: int = DEFAULT_SCHEDULE["epochs"], epoch_size: int = DEFAULT_SCHEDULE["epoch_size"],
          minibatch_size: int = DEFAULT_SCHEDULE["minibatch_size"], label_radius: int = 3,
          expected_particles: int | None = None, model: str = "resnet8", method: str = "GE-binomial") -> dict:
    """``topaz train`` with the given schedule; returns the measurement, the per-epoch curve and the model path.

    ``label_radius`` is Topaz's ``--radius`` (pixels around each label counted positive, binned grid; Topaz's
    default 3). ``expected_particles`` (``-n``, per micrograph) defaults to the mean ground-truth count of the
    training micrographs.
    """
    workdir = Path(workdir)
    expected = dataset.expected_particles() if expected_particles is None else int(expected_particles)
    prefix = workdir / "model"
    for old in workdir.glob("model_epoch*.sav"):
        old.unlink()
    cmd = topaz_command(
        "train", "-d", -1, "--num-workers", 0, "-j", threads,
        "--train-images", inputs["train_images"], "--train-targets", inputs["train_targets"],
        "--test-images", inputs["test_images"], "--test-targets", inputs["test_targets"],
        "-n", expected, "--radius", label_radius, "--method", method, "--model", model,
        "--minibatch-size", minibatch_size, "--epoch-size", epoch_size, "--num-epochs", epochs,
        "--pretrained" if pretrained else "--no-pretrained", "--save-prefix", prefix)
    res = run_measured(cmd, threads, log_path=workdir / "train.log")
    curve = _parse_training(res["lines"])
    steps, tests = curve["steps"], curve["tests"]
    if len(steps) != epochs * epoch_size:
        raise RuntimeError(f"topaz train printed {len(steps)} steps, expected {epochs * epoch_size}: see "
                           f"{workdir / 'train.log'}")
    models = sorted(workdir.glob("model_epoch*.sav"), key=lambda p: int(p.stem.split("epoch")[-1]))
    # Steady training speed: time between consecutive step lines inside each epoch (no start-up, no test pass).
    spans, counted = 0.0, 0
    epoch_rows = []
    prev_end = 0.0
    for e in range(1, epochs + 1):
        ts = [s["t"] for s in steps if s["epoch"] == e]
        if len(ts) > 1:
            spans += ts[-1] - ts[0]
            counted += len(ts) - 1
        test = next((r for r in tests if r["epoch"] == e), None)
        end = test["t"] if test else ts[-1]
        row = dict(epoch=e, elapsed_s=end, train_s=ts[-1] - prev_end, test_pass_s=(end - ts[-1]) if test else 0.0,
                   train_loss_last=steps[e * epoch_size - 1].get("loss"))
        if test:
            row.update({f"heldout_{k}": test.get(k) for k in ("loss", "precision", "adjusted_precision", "tpr",
                                                                "fpr", "auprc")})
        epoch_rows.append(row)
        prev_end = end
    n_examples = epochs * epoch_size * minibatch_size
    pretrained_loaded = any("Loading pretrained model" in text for _, _, text in res["lines"])
    pi_line = next((text for _, _, text in res["lines"] if "Setting pi" in text), None)
    return _summary(
        res, model_path=str(models[-1]) if models else None, pretrained=bool(pretrained),
        pretrained_loaded=pretrained_loaded, model=model, method=method, epochs=epochs, epoch_size=epoch_size,
        minibatch_size=minibatch_size, steps=epochs * epoch_size, label_radius=label_radius,
        expected_particles=expected, pi=float(pi_line.split("=")[-1]) if pi_line else None,
        n_train_micrographs=len(dataset.train), n_watch_micrographs=len(dataset.watch),
        examples=n_examples, examples_per_s=n_examples / res["wall_s"], examples_per_cpu_s=n_examples / res["cpu_s"],
        examples_per_s_steady=(counted * minibatch_size / spans) if spans > 0 else None,
        first_step_s=steps[0]["t"], test_pass_total_s=sum(r["test_pass_s"] for r in epoch_rows),
        per_epoch=epoch_rows)


def score(dataset: Dataset, workdir, model_path, preprocessed_dir, names=None, threads: int = 1) -> dict:
    """``topaz segment``: per-pixel logit maps of ``names`` (default: held-out) into ``workdir/scores``."""
    names = list(dataset.heldout if names is None else names)
    dest = Path(workdir) / "scores"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = topaz_command("segment", "-m", model_path, "-d", -1, "-j", threads, "-v", "-o", dest,
                        *[Path(preprocessed_dir) / f"{n}.mrc" for n in names])
    res = run_measured(cmd, threads, log_path=Path(workdir) / "score.log")
    return _summary(res, destdir=str(dest), **_per_item(res, "# saving:", len(names)))


def extract(dataset: Dataset, workdir, scores_dir, names=None, threads: int = 1, threshold: float = -6.0,
            radius: int | None = None) -> dict:
    """``topaz extract -m none`` on the score maps: NMS with ``radius`` (default: binned particle radius).

    Coordinates come out scaled by the downsampling factor (``-x``), i.e. in original pixels.
    """
    names = list(dataset.heldout if names is None else names)
    radius = dataset.binned_radius if radius is None else int(radius)
    out = Path(workdir) / "picks_topaz.txt"
    cmd = topaz_command("extract", "-m", "none", "-r", radius, "-t", threshold, "-x", dataset.downsample,
                        "--num-workers", 0, "-j", threads, "-v", "-o", out,
                        *[Path(scores_dir) / f"{n}.tiff" for n in names])
    res = run_measured(cmd, threads, log_path=Path(workdir) / "extract.log")
    return _summary(res, picks_path=str(out), radius=radius, threshold=threshold, up_scale=dataset.downsample,
                    **_per_item(res, "Extracted", len(names)))


def read_picks(path) -> pd.DataFrame:
    """Topaz's pick file as our pick table: columns ``micrograph, x, y, score`` (original pixels)."""
    table = pd.read_csv(path, sep="\t", dtype={"image_name": str})
    return pd.DataFrame({"micrograph": table["image_name"].astype(str), "x": table["x_coord"].astype(float),
                         "y": table["y_coord"].astype(float), "score": table["score"].astype(float)})


def evaluate_picks(picks: pd.DataFrame, dataset: Dataset, names=None, match_radius: float | None = None,
                   margin: float = 0.0) -> dict:
    """Evaluate picks with ``napari_pupick.metrics.evaluate`` against ALL particles of ``names`` (held-out).

    ``match_radius`` defaults to half the particle radius (original pixels). ``margin`` > 0 evaluates the
    interior only: picks AND true particles closer than ``margin`` to the micrograph border are dropped first.
    """
    from napari_pupick.metrics import evaluate

    names = list(dataset.heldout if names is None else names)
    match_radius = dataset.match_radius if match_radius is None else float(match_radius)
    truth = dataset.particles(names)
    picks = picks[picks["micrograph"].isin(names)].reset_index(drop=True)
    if margin > 0:
        shapes = {name: _mrc_shape(dataset.micrograph_path(name)) for name in names}
        picks, truth = _interior(picks, shapes, margin), _interior(truth, shapes, margin)
    result = evaluate(picks, truth, match_radius)
    result = {k: _jsonable(v) for k, v in dict(result).items()}
    result.update(match_radius=match_radius, margin=margin)
    return result


def _interior(table: pd.DataFrame, shapes: dict, margin: float) -> pd.DataFrame:
    """Rows at least ``margin`` pixels from the border of their micrograph (``shapes``: name -> (rows, cols))."""
    h = table["micrograph"].map(lambda n: shapes[n][0]).to_numpy(float)
    w = table["micrograph"].map(lambda n: shapes[n][1]).to_numpy(float)
    x, y = table["x"].to_numpy(float), table["y"].to_numpy(float)
    inside = (x >= margin) & (y >= margin) & (x <= w - 1 - margin) & (y <= h - 1 - margin)
    return table[inside].reset_index(drop=True)


def evaluate_all(picks: pd.DataFrame, dataset: Dataset, margins=(0.0,)) -> dict:
    """``evaluate_picks`` for each edge margin: ``{"margin_<m>": {...}}``; an ``error`` entry when
    ``napari_pupick.metrics`` cannot be imported (evaluate later with ``--evaluate-only``)."""
    try:
        return {f"margin_{m:g}": evaluate_picks(picks, dataset, margin=m) for m in margins}
    except ImportError as exc:
        return {"error": f"napari_pupick.metrics not available: {exc}"}


def _jsonable(value):
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return None  # curves are left out of the JSON
    if isinstance(value, (list, tuple)):
        return None if len(value) > 50 else [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return None


def evaluate_epochs(dataset: Dataset, run_dir, preprocessed_dir, epochs, threads: int = 1, threshold: float = -6.0,
                    margins=(0.0,)) -> list:
    """Particle-level AP of the models Topaz saved after each epoch in ``epochs`` (``model_epoch<N>.sav``).

    Scores and extracts the held-out micrographs with each snapshot (in ``run_dir/epoch<N>/``) and evaluates the
    picks like the final ones. Returns one dict per epoch: ``epoch``, ``score``, ``extract``, ``evaluation``.
    """
    run_dir = Path(run_dir)
    out = []
    for e in epochs:
        model = next((m for m in run_dir.glob("model_epoch*.sav") if int(m.stem.split("epoch")[-1]) == e), None)
        if model is None:
            raise FileNotFoundError(f"{run_dir}: no model_epoch file for epoch {e}")
        sub = run_dir / f"epoch{e}"
        sub.mkdir(exist_ok=True)
        sc = score(dataset, sub, model, preprocessed_dir, threads=threads)
        ex = extract(dataset, sub, sc["destdir"], threads=threads, threshold=threshold)
        picks = read_picks(ex["picks_path"])
        picks.to_csv(sub / "picks.csv", index=False)
        out.append(dict(epoch=int(e), model_path=str(model), score=sc, extract=ex,
                        evaluation=evaluate_all(picks, dataset, margins)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the whole pipeline


def run_topaz_pipeline(dataset: Dataset, workdir, threads: int = 1, pretrained: bool = False,
                       epochs: int = DEFAULT_SCHEDULE["epochs"], epoch_size: int = DEFAULT_SCHEDULE["epoch_size"],
                       minibatch_size: int = DEFAULT_SCHEDULE["minibatch_size"], label_radius: int = 3,
                       threshold: float = -6.0, reuse_preprocessed: bool = True, margins=(0.0,),
                       preprocess_result: dict | None = None, snapshot_epochs=()) -> dict:
    """Preprocess, train, score, extract and evaluate with Topaz; measure every stage.

    Parameters
    ----------
    dataset : Dataset
        From ``benchmarks/common.py``.
    workdir : path
        Scratch folder; ``preprocessed/`` is shared by runs of the same dataset, everything else goes in
        ``<variant>/`` (``pretrained`` or ``scratch``).
    threads : int
        Threads of every Topaz process (``-j`` and the OMP/MKL/OpenBLAS variables).
    pretrained : bool
        Start from Topaz's bundled resnet8 weights (its default) instead of a random initialization.
    epochs, epoch_size, minibatch_size : int
        Training schedule (Topaz's defaults are 10, 1000, 256).
    label_radius : int
        Topaz's ``train --radius`` on the binned grid.
    threshold : float
        Extraction threshold on the logit.
    reuse_preprocessed : bool
        Skip preprocessing when ``preprocess_result`` is given or ``workdir/preprocess.json`` exists.
    margins : sequence of float
        Edge margins (original pixels) to evaluate with; 0 = all picks.
    snapshot_epochs : sequence of int
        Also score, extract and evaluate the models saved after these epochs (``epoch_snapshots``).

    Returns
    -------
    dict
        ``dataset``, ``variant``, ``stages`` (``preprocess``, ``train``, ``score``, ``extract``: wall_s, cpu_s,
        peak_rss_mb, n_micrographs and per-micrograph times; ``train`` with examples/s and the per-epoch
        held-out curve), ``evaluation`` (one entry per margin), ``picks_path`` (CSV, original pixels) and the
        environment.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    variant = "pretrained" if pretrained else "scratch"
    pre_json = workdir / "preprocess.json"
    if preprocess_result is None and reuse_preprocessed and pre_json.is_file():
        earlier = json.loads(pre_json.read_text())
        complete = all((Path(earlier["destdir"]) / f"{n}.mrc").is_file() for n in dataset.names)
        same_scale = earlier["cmd"][earlier["cmd"].index("-s") + 1] == str(dataset.downsample)
        if complete and same_scale:
            preprocess_result = dict(earlier, reused=True)
    if preprocess_result is None:
        preprocess_result = preprocess(dataset, workdir, threads=threads)
        pre_json.write_text(json.dumps(preprocess_result, indent=1))
    pre_dir = preprocess_result["destdir"]
    run_dir = workdir / variant
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = dataset.labels()
    inputs = write_training_inputs(dataset, run_dir, pre_dir, labels)
    tr = train(dataset, run_dir, inputs, threads=threads, pretrained=pretrained, epochs=epochs,
               epoch_size=epoch_size, minibatch_size=minibatch_size, label_radius=label_radius)
    sc = score(dataset, run_dir, tr["model_path"], pre_dir, threads=threads)
    ex = extract(dataset, run_dir, sc["destdir"], threads=threads, threshold=threshold)
    picks = read_picks(ex["picks_path"])
    picks_csv = run_dir / "picks.csv"
    picks.to_csv(picks_csv, index=False)
    evaluation = evaluate_all(picks, dataset, margins)
    snapshots = evaluate_epochs(dataset, run_dir, pre_dir, snapshot_epochs, threads=threads, threshold=threshold,
                                margins=margins) if snapshot_epochs else []
    return dict(
        tool="topaz", topaz_version=_topaz_version(), dataset=dataset.describe(), variant=variant,
        n_labels=int(len(labels)), threads=threads,
        stages=dict(preprocess=preprocess_result, train=tr, score=sc, extract=ex),
        evaluation=evaluation, epoch_snapshots=snapshots, picks_path=str(picks_csv), workdir=str(run_dir),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()),
    )


def _topaz_version() -> str | None:
    try:
        out = subprocess.run(topaz_command("--version"), capture_output=True, text=True, timeout=120)
        return (out.stdout or out.stderr).strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["synthetic", "apoferritin", "ribosome"])
    parser.add_argument("--workdir", default="/tmp/topaz_bench", help="scratch folder (default: %(default)s)")
    parser.add_argument("--out", default="/work/bench_out/topaz", help="where JSON and picks go")
    parser.add_argument("--variants", default="scratch,pretrained", help="comma-separated: scratch, pretrained")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=DEFAULT_SCHEDULE["epochs"])
    parser.add_argument("--epoch-size", type=int, default=DEFAULT_SCHEDULE["epoch_size"])
    parser.add_argument("--minibatch-size", type=int, default=DEFAULT_SCHEDULE["minibatch_size"])
    parser.add_argument("--n-labels", type=int, default=100)
    parser.add_argument("--label-seed", type=int, default=0)
    parser.add_argument("--margin", type=float, action="append", default=None,
                        help="edge margin(s) for evaluation, original pixels (default: 0 and the particle radius)")
    parser.add_argument("--snapshot-epochs", type=int, nargs="*", default=[],
                        help="also evaluate the models Topaz saved after these epochs (particle-level AP)")
    parser.add_argument("--summary", action="store_true", help="print a markdown table of the runs in --out")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-evaluate the picks of earlier runs in --out (no Topaz run)")
    args = parser.parse_args(argv)

    if args.summary:
        print(summarize(args.out))
        return 0
    work = Path(args.workdir) / args.dataset
    dataset = get_dataset(args.dataset, workdir=Path(args.workdir) / "data", n_labels=args.n_labels,
                          label_seed=args.label_seed)
    margins = args.margin if args.margin else [0.0, dataset.radius]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in ("scratch", "pretrained"):
            parser.error(f"unknown variant {variant!r}")
        tag = f"{args.dataset}_{variant}_t{args.threads}"
        if args.evaluate_only:
            result = json.loads((out / f"{tag}.json").read_text())
            picks = pd.read_csv(out / f"picks_{tag}.csv", dtype={"micrograph": str})
            result["evaluation"] = evaluate_all(picks, dataset, margins)
            for snap in result.get("epoch_snapshots", []):
                snap_picks = Path(snap["extract"]["picks_path"]).with_name("picks.csv")
                snap["evaluation"] = evaluate_all(pd.read_csv(snap_picks, dtype={"micrograph": str}), dataset,
                                                  margins)
            if args.snapshot_epochs:
                result["epoch_snapshots"] = evaluate_epochs(
                    dataset, result["workdir"], result["stages"]["preprocess"]["destdir"], args.snapshot_epochs,
                    threads=args.threads, margins=margins)
            (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
            _print_result(tag, result)
            continue
        result = run_topaz_pipeline(dataset, work, threads=args.threads, pretrained=variant == "pretrained",
                                    epochs=args.epochs, epoch_size=args.epoch_size,
                                    minibatch_size=args.minibatch_size, margins=margins,
                                    snapshot_epochs=args.snapshot_epochs)
        pd.read_csv(result["picks_path"], dtype={"micrograph": str}).to_csv(out / f"picks_{tag}.csv", index=False)
        (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
        _print_result(tag, result)
    return 0


def _fmt(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _per_mic(stage: dict) -> str:
    return (f"{_fmt(stage.get('median_wall_per_micrograph_s'))} / {_fmt(stage['cpu_per_micrograph_s'])}"
            f" / {stage['peak_rss_mb']:.0f}")


def summarize(out_dir) -> str:
    """A markdown table of every ``<dataset>_<variant>_t<threads>.json`` in ``out_dir``."""
    rows = []
    for path in sorted(Path(out_dir).glob("*_t[0-9]*.json")):
        r = json.loads(path.read_text())
        st = r["stages"]
        pre, tr, sc, ex = st["preprocess"], st["train"], st["score"], st["extract"]
        ev = {k: v for k, v in r["evaluation"].items() if isinstance(v, dict)}
        last = tr["per_epoch"][-1] if tr.get("per_epoch") else {}
        evs = "; ".join(f"{k.replace('margin_', '')}: {_fmt(v.get('ap'), '{:.3f}')}, "
                        f"{_fmt(v.get('precision_at_90'), '{:.3f}')}" for k, v in ev.items())
        rows.append("| " + " | ".join([
            r["dataset"]["name"], r["variant"], str(r["threads"]), _per_mic(pre),
            f"{tr['steps']} x {tr['minibatch_size']}",
            f"{tr['wall_s']:.0f} / {tr['cpu_s']:.0f} / {tr['peak_rss_mb']:.0f}",
            f"{tr['examples_per_s']:.0f} / {_fmt(tr.get('examples_per_s_steady'), '{:.0f}')}",
            _fmt(last.get("heldout_auprc"), "{:.3f}"), _per_mic(sc), _per_mic(ex),
            evs, f"{_fmt(tr.get('cpu_share'))} / {_fmt(tr.get('load_avg_1min'), '{:.1f}')}"]) + " |")
    head = ("| dataset | variant | threads | preprocess s/mic (median wall / CPU) / peak MB | steps x batch "
            "| train wall s / CPU s / peak MB | examples/s (overall / steady) | Topaz held-out AUPRC (last epoch) "
            "| score s/mic (median wall / CPU) / peak MB | extract s/mic (median wall / CPU) / peak MB "
            "| edge margin px: AP, P@90 | train CPU share / load |")
    sep = "|" + "---|" * (head.count("|") - 1)
    return "\n".join([head, sep] + rows) + "\n"


def _print_result(tag: str, result: dict) -> None:
    tr = result["stages"]["train"]
    parts = [f"{tag}: train {tr['wall_s']:.0f} s wall, {tr['cpu_s']:.0f} s CPU ({tr['examples_per_s']:.0f} ex/s)"]
    for key, ev in result["evaluation"].items():
        if isinstance(ev, dict):
            parts.append(f"{key}: AP {ev.get('ap')}, P@90 {ev.get('precision_at_90')}")
        else:
            parts.append(f"{key}: {ev}")
    print(", ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
