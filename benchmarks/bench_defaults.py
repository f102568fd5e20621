"""What a user gets from the defaults: the minimal command on every shared set, the binning sweep behind the
automatic binning rule, and the stability of the default threshold.

    python benchmarks/bench_defaults.py minimal                 # the minimal command, 3 sets x 3 label seeds
    python benchmarks/bench_defaults.py binning                 # AP against the binned particle radius
    python benchmarks/bench_defaults.py shift                   # 5 labels moved by half a pixel: picks at the default
    python benchmarks/bench_defaults.py hand                    # best hand-chosen settings (true count, best binning)
    python benchmarks/bench_defaults.py labels --seeds 0 1      # AP against 10/25/50/100 labels, scratch and general

``minimal`` is what a new user types: micrographs, labels, radius, nothing else (``train_picker(images, names,
labels, radius=r)`` = ``pupick train mics/ --labels clicks.txt --radius r -o model.pt``), 100 labels drawn from the
training micrographs (``benchmarks/common.py``), picks of the held-out micrographs with every candidate kept,
scored against EVERY ground-truth particle there (match radius half the particle radius). Reported: the binning
chosen, the count estimated against the truth, AP, the best F1 over all thresholds, and the F1, precision and recall
at the model's own threshold with its own default edge margin (what ``pupick extract`` writes).

Runs go two at a time in separate processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def _f1_at(picks, truth, radius, threshold) -> dict:
    from napari_pupick.metrics import match_picks

    kept = picks[picks["score"] >= threshold]
    hit = match_picks(kept, truth, radius) if len(kept) else np.zeros(0, bool)
    tp = int(hit.sum())
    p = tp / len(kept) if len(kept) else 0.0
    r = tp / len(truth) if len(truth) else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return dict(f1=f1, precision=p, recall=r, n=int(len(kept)))


def score_picks(picks, truth, radius, threshold) -> dict:
    """AP and best F1 over all picks, and F1/precision/recall at ``threshold``."""
    from napari_pupick.metrics import evaluate

    full = evaluate(picks, truth, radius, beta=1.0)
    at = _f1_at(picks, truth, radius, threshold)
    return dict(ap=float(full["ap"]), best_f1=float(full["fbeta"]), best_f1_threshold=float(full["threshold"]),
                f1_default=at["f1"], precision_default=at["precision"], recall_default=at["recall"],
                picks_default=at["n"], n_true=int(full["n_true"]))


def run_one(ds_name: str, seed: int, n_labels: int, train_kw: dict, label_shift: float = 0.0) -> dict:
    """Train as ``train_kw`` says (empty: the minimal command), pick the held-out micrographs, score."""
    import torch

    import common
    from napari_pupick.io import read_micrograph
    from napari_pupick.pipeline import ALL_CANDIDATES, Picker, train_picker

    torch.set_num_threads(1)
    ds = common.get_dataset(ds_name).with_labels(n_labels, seed)
    labels = ds.labels()
    if label_shift:
        labels = labels.copy()
        labels.loc[labels.index[:5], "x"] += label_shift
    train_images = [read_micrograph(p) for p in ds.micrograph_paths(ds.train)]
    t0 = time.perf_counter()
    c0 = time.process_time()
    ckpt = train_picker(train_images, list(ds.train), labels, radius=ds.radius, seed=seed, **train_kw)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    picker = Picker(ckpt, device="cpu")
    truth = ds.particles(ds.heldout)
    picks = picker.pick_files(ds.micrograph_paths(ds.heldout), threshold=ALL_CANDIDATES)
    m = ckpt.metrics or {}
    true_count = float(truth.groupby("micrograph").size().mean())
    out = dict(dataset=ds.name, seed=seed, n_labels=len(labels), settings=train_kw or "minimal",
               label_shift=label_shift, downsample=int(picker.factor), threshold=picker.threshold,
               margin=picker.margin, expected_estimate=m.get("expected_particles"),
               expected_true=true_count, train_s=train_s, train_cpu_s=train_cpu, kept=m.get("kept"))
    out.update(score_picks(picks, truth, ds.match_radius, picker.threshold))
    return out


def main(argv=None):
    import pandas as pd

    import common

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    for name in ("minimal", "binning", "shift", "hand", "labels"):
        s = sub.add_parser(name)
        s.add_argument("--datasets", nargs="+", default=list(common.REAL_DATASETS))
        s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        s.add_argument("--labels", type=int, default=100)
        s.add_argument("--workers", type=int, default=2)
        s.add_argument("--out", default="bench_out")
        if name == "labels":
            s.add_argument("--counts", type=int, nargs="+", default=[10, 25, 50, 100])
            s.add_argument("--inits", nargs="+", default=["none", "general"],
                           help="where training starts: none, general or a checkpoint file")
        if name == "binning":
            s.add_argument("--binned-radii", type=float, nargs="+", default=[4.0, 5.0, 6.0, 7.5, 9.5, 12.0, 15.0])
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = []
    for name in args.datasets:
        ds = common.get_dataset(name)
        truth_count = ds.expected_particles()
        for seed in args.seeds:
            if args.bench == "minimal":
                jobs.append((name, seed, args.labels, {}))
            elif args.bench == "shift":
                jobs += [(name, seed, args.labels, {}, 0.0), (name, seed, args.labels, {}, 0.5)]
            elif args.bench == "labels":
                jobs += [(name, seed, n, {"init": init}) for n in args.counts for init in args.inits]
            elif args.bench == "hand":
                jobs.append((name, seed, args.labels, dict(downsample=ds.downsample, expected_particles=truth_count)))
            else:
                factors = sorted({max(1, int(round(ds.radius / b))) for b in args.binned_radii})
                jobs += [(name, seed, args.labels, dict(downsample=f, expected_particles=truth_count))
                         for f in factors]
    results = common.parallel(run_one, jobs, args.workers)
    df = pd.DataFrame(results)
    wall = time.perf_counter() - t0
    (out / f"defaults_{args.bench}.json").write_text(json.dumps(dict(results=results, wall_s=wall), indent=2,
                                                                default=str))
    keys = ["dataset", "downsample"] if args.bench == "binning" else ["dataset"]
    if args.bench == "labels":
        df["init"] = [str((r or {}).get("init")) if isinstance(r, dict) else "minimal" for r in df["settings"]]
        keys = ["dataset", "init", "n_labels"]
    if args.bench == "shift":
        keys = ["dataset", "label_shift"]
    cols = ["ap", "best_f1", "f1_default", "precision_default", "recall_default", "picks_default", "threshold",
            "train_cpu_s"]
    if args.bench in ("minimal", "shift"):
        cols += ["expected_estimate", "expected_true"]
    g = df.groupby(keys)[cols].mean(numeric_only=True).reset_index()
    print(common.markdown(g))
    if args.bench == "shift":
        piv = df.pivot_table(index=["dataset", "seed"], columns="label_shift", values="picks_default")
        piv["change"] = (piv[0.5] - piv[0.0]).abs() / piv[0.0]
        print()
        print(common.markdown(piv.reset_index()))
    print(f"\n{len(results)} runs in {wall / 60:.1f} min -> {out / f'defaults_{args.bench}.json'}")


if __name__ == "__main__":
    main()
