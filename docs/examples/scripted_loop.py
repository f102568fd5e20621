"""The label-train-inspect loop as a script: the same PickLoop the dock widgets use, with no window.

Runs headless on a napari ``ViewerModel`` (no Qt, no display) in a few minutes on a CPU; paste the body of
``run`` into the napari console (with ``viewer`` being the open viewer) to drive a real window instead.

What it does, on synthetic micrographs with known particles:

1. writes 6 micrographs (MRC) and sparse labels (STAR) to a folder, and opens them with the plugin's reader;
2. bins by 2 and normalizes with the dataset-wide GMM;
3. takes the labels as positives, trains (showing progress from the event generator), picks every micrograph;
4. corrects like a user would on one micrograph (deletes false picks, adds missed particles) and retrains from
   the current model;
5. exports STAR (one file, and one per micrograph for RELION) and CSV, above the F2-optimal threshold.

Usage::

    .venv/bin/python docs/examples/scripted_loop.py [--out scripted_out] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def run(out="scripted_out", quick: bool = False, seed: int = 0) -> dict:
    from napari.components import ViewerModel
    from scipy.spatial import cKDTree

    from napari_pupick._reader import read_micrographs
    from napari_pupick.io import read_coordinates
    from napari_pupick.loop import PickLoop
    from napari_pupick.metrics import evaluate
    from napari_pupick.synthetic import make_synthetic

    out = Path(out)
    radius = 12.0
    # a tiny network and a short schedule for --quick (tests); the widget's defaults otherwise
    train = dict(epochs=1, steps_per_epoch=4, model_params={"width": 0.25}, batch_size=4) if quick else \
        dict(epochs=4, steps_per_epoch=20)
    retrain = dict(train, epochs=1) if quick else dict(train, epochs=2)

    syn = make_synthetic(n_micrographs=6, shape=(512, 512), n_particles=60, radius=radius, n_labels=45,
                         label_micrographs=3, seed=seed)
    files = syn.write(out / "data")
    truth = syn.particles[["micrograph", "x", "y"]]

    # -- open the micrographs with the plugin's reader (a lazy stack, names in the metadata) ---------------
    # (in a napari window: viewer.open(folder, plugin="napari-pupick") does the same)
    viewer = ViewerModel()
    [(data, kwargs, _)] = read_micrographs(str(out / "data" / "micrographs"))
    layer = viewer.add_image(data, **kwargs)
    loop = PickLoop.for_viewer(viewer)
    loop.set_micrographs(layer)
    print(f"opened {layer.name}: {loop.n_planes} micrographs {layer.data.shape[1:]}")

    # -- preprocess ---------------------------------------------------------------------------------------------
    loop.preprocess(downsample=2, method="gmm")
    gmm = loop.preprocessor.gmm
    print(f"normalized (GMM p={gmm.p:.2f}), binned by {loop.factor}: {loop.normalized_layer.data.shape}")

    # -- labels: a particle radius and expected count, and the clicks from a file ------------------------------
    loop.add_positives_layer(radius=radius, expected_particles=60)
    n = loop.add_positives(read_coordinates(files["labels"]))
    print(f"{n} positive labels on {syn.labels['micrograph'].nunique()} micrographs")

    # -- train, following the generator's events (what the Train widget's worker does) --------------------------
    t0 = time.perf_counter()
    for event in loop.iter_train(holdout_fraction=0.34, seed=seed, **train):
        loop.handle(event)
        ev = event.data
        if event.kind == "train" and ev.kind in ("start", "epoch", "done", "stopped"):
            print(f"  [{time.perf_counter() - t0:5.1f} s] {ev.message}")
    print(f"trained: {loop.checkpoint.model}, held-out metrics {dict(loop.checkpoint.metrics)}")

    # -- predict and inspect ------------------------------------------------------------------------------------
    loop.margin = radius
    loop.predict()
    threshold = loop.suggested_threshold if loop.suggested_threshold is not None else 0.0
    loop.set_threshold(threshold)
    first = evaluate(loop.picks_table(all_picks=True), truth, radius / 2)
    print(f"picked: {len(loop.picks_table(all_picks=True))} candidates, {len(loop.picks_table())} at threshold "
          f"{threshold:.2f}; AP against every particle {first['ap']:.3f}")
    print("picks per micrograph:", loop.picks_per_micrograph().to_dict())

    # -- correct one micrograph as a user would: delete false picks, click missed particles -----------------
    name = loop.names[0]
    layer = loop.picks_layer
    data = np.asarray(layer.data)
    shown = np.flatnonzero(layer.shown & (np.rint(data[:, 0]) == 0))
    true_xy = truth[truth["micrograph"] == name][["y", "x"]].to_numpy()
    dist, _ = cKDTree(true_xy).query(data[shown, 1:])
    false = shown[dist > radius / 2]
    layer.selected_data = set(false.tolist())
    layer.remove_selected()  # the Delete key: each deleted pick becomes a negative label
    kept = np.asarray(layer.data)[layer.shown & (np.rint(np.asarray(layer.data)[:, 0]) == 0)]
    dist, _ = cKDTree(kept[:, 1:]).query(true_xy) if len(kept) else (np.full(len(true_xy), np.inf), None)
    missed = true_xy[dist > radius / 2][:10]
    layer.add(np.column_stack([np.zeros(len(missed)), missed]))  # clicks in the picks layer become positives
    positives, negatives = loop.labels()
    print(f"corrections on {name}: {len(false)} picks rejected, {len(missed)} particles added -> "
          f"{len(positives)} positives, {len(negatives)} negatives")

    # -- retrain from the current model with positives, negatives and the unlabeled rest ------------------------
    loop.retrain(holdout_fraction=0.34, seed=seed, **retrain)
    loop.predict()
    threshold = loop.suggested_threshold if loop.suggested_threshold is not None else threshold
    loop.set_threshold(threshold)
    second = evaluate(loop.picks_table(all_picks=True), truth, radius / 2)
    print(f"after retraining: AP {second['ap']:.3f} (was {first['ap']:.3f}); {len(loop.picks_table())} picks at "
          f"threshold {threshold:.2f}")

    # -- export above the threshold, in original micrograph pixels ----------------------------------------------
    star = loop.export(out / "picks.star")
    relion = loop.export(out / "picks_relion", per_micrograph=True, suffix="_autopick")
    csv = loop.export(out / "picks.csv")
    loop.save_model(out / "model.pt")
    print(f"wrote {star}, {csv}, {len(relion)} files in {out / 'picks_relion'} and {out / 'model.pt'}")
    return {"ap_first": first["ap"], "ap_retrained": second["ap"], "n_picks": len(loop.picks_table()),
            "star": star, "relion": relion, "csv": csv, "loop": loop}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the napari-pupick loop headless on synthetic data.")
    parser.add_argument("--out", default="scripted_out")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = run(args.out, quick=args.quick)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
