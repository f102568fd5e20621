"""Picking quality of the four PU objectives: real data (AP over seeds) and the shape of the paper's Figure 5.

Two benchmarks, one command each (run by hand; figures go to docs/benchmarks.md):

    python benchmarks/bench_quality.py real --dataset apoferritin      # ~10 min on 2 cores
    python benchmarks/bench_quality.py real --dataset ribosome
    python benchmarks/bench_quality.py labels                          # synthetic: AP vs number of labels (~17 min)

``real``: 100 labels drawn (seeded) from the dataset's training micrographs (``benchmarks/common.py``), a model
trained per objective and seed on the training micrographs only, picks on the held-out micrographs evaluated
against EVERY particle there. Match radius = half the particle radius; NMS radius = the particle radius; edge
margin = half the particle radius; threshold -6 (AP ranks all picks). The seed draws the labels and initializes
the network.

``labels``: a synthetic set (8 micrographs 512 x 512, radius 12, SNR 0.1): 10, 50, 100, 250 labels from the 6
training micrographs, AP on the 2 others, per objective, with and without the autoencoder (gamma = 10 / N), for
each of ``--seeds`` (mean and standard deviation over them).

Runs go two at a time in separate processes with one torch thread each (faster than two threads per run here).
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


OBJECTIVES = ("ge-binomial", "ge-kl", "nnpu", "pn")


def run_one(ds, objective: str, seed: int, n_labels: int, autoencoder: float = 0.0, train_kw=None,
            prior_scale: float = 1.0) -> dict:
    """Train on ``ds.train`` with ``n_labels`` labels, pick ``ds.heldout``, evaluate against all particles.

    ``prior_scale`` multiplies the expected particles per micrograph (and so the class prior pi)."""
    import torch

    from napari_pupick.io import read_micrograph
    from napari_pupick.metrics import evaluate
    from napari_pupick.pipeline import Picker, train_picker

    torch.set_num_threads(1)
    ds = ds.with_labels(n_labels, seed)
    labels = ds.labels()
    train_images = [read_micrograph(p) for p in ds.micrograph_paths(ds.train)]
    t0 = time.perf_counter()
    ckpt = train_picker(train_images, list(ds.train), labels, radius=ds.radius, downsample=ds.downsample,
                        expected_particles=ds.expected_particles() * prior_scale, objective=objective, seed=seed,
                        autoencoder=autoencoder, device="cpu", threads=1, **(train_kw or {}))
    train_s = time.perf_counter() - t0
    picker = Picker(ckpt, device="cpu")
    t0 = time.perf_counter()
    picks = picker.pick_files(ds.micrograph_paths(ds.heldout), radius=ds.radius, threshold=-6.0,
                              margin=ds.radius / 2)
    pick_s = (time.perf_counter() - t0) / len(ds.heldout)
    result = evaluate(picks, ds.particles(ds.heldout), ds.match_radius)
    return dict(dataset=ds.name, objective=objective, seed=seed, n_labels=len(labels), autoencoder=autoencoder,
                prior_scale=prior_scale,
                ap=float(result["ap"]), precision_at_90=float(result["precision_at_90"]),
                recall_max=float(result["recall_max"]), n_picks=int(result["n_picks"]), n_true=int(result["n_true"]),
                train_s=train_s, pick_s_per_mic=pick_s)


def _summary(results, keys):
    import pandas as pd

    df = pd.DataFrame(results)
    g = df.groupby(keys)["ap"]
    table = pd.DataFrame({"AP mean": g.mean(), "AP sd": g.std(ddof=1), "runs": g.size()}).reset_index()
    return table


def main(argv=None):
    import common

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    r = sub.add_parser("real")
    r.add_argument("--dataset", default="apoferritin", choices=["apoferritin", "ribosome"])
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--labels", type=int, default=100)
    r.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--model", default=None, help="network (conv3, resnet8; default: the default conv3)")
    r.add_argument("--epochs", type=int, default=None, help="training epochs (default: the default schedule's 5)")
    r.add_argument("--out", default="bench_out")
    s = sub.add_parser("labels")
    s.add_argument("--counts", type=int, nargs="+", default=[10, 50, 100, 250])
    s.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="label draws and network initializations per cell (default: %(default)s; 32 runs per seed)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--epochs", type=int, default=None, help="training epochs (default: the default schedule's 5)")
    s.add_argument("--no-autoencoder", action="store_true", help="skip the runs with the autoencoder")
    s.add_argument("--prior-scales", type=float, nargs="+", default=[1.0],
                   help="multiply the expected particles (the prior pi) by each of these (default: %(default)s)")
    s.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.bench == "real":
        ds = common.get_dataset(args.dataset)
        train_kw = {k: v for k, v in dict(model=args.model, epochs=args.epochs).items() if v is not None}
        jobs = [(ds, obj, seed, args.labels, 0.0, train_kw) for obj in args.objectives for seed in args.seeds]
        results = common.parallel(run_one, jobs, args.workers)
        table = _summary(results, ["objective"])
        name = f"quality_{args.dataset}" + "".join(f"_{k}{v}" for k, v in train_kw.items())
    else:
        ds = common.get_dataset("synthetic", workdir=out, n_micrographs=8, shape=(512, 512), radius=12.0,
                                n_train=6, downsample=1)
        jobs = []
        train_kw = {"epochs": args.epochs} if args.epochs else {}
        for seed in args.seeds:
            for n in args.counts:
                for obj in args.objectives:
                    for ae in ((0.0,) if args.no_autoencoder else (0.0, 10.0 / n)):
                        for k in args.prior_scales:
                            jobs.append((ds, obj, seed, n, ae, train_kw, k))
        results = common.parallel(run_one, jobs, args.workers)
        for res in results:
            res["autoencoder_on"] = res["autoencoder"] > 0
        keys = ["n_labels", "objective", "autoencoder_on"] + (["prior_scale"] if len(args.prior_scales) > 1 else [])
        table = _summary(results, keys)
        name = "quality_labels" + (f"_e{args.epochs}" if args.epochs else "") + (
            "_prior" if len(args.prior_scales) > 1 else "")
    wall = time.perf_counter() - t0
    (out / f"{name}.json").write_text(json.dumps(dict(results=results, wall_s=wall), indent=2))
    print(common.markdown(table))
    print(f"\n{len(results)} runs in {wall / 60:.1f} min -> {out / (name + '.json')}")


if __name__ == "__main__":
    main()
