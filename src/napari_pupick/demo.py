"""The whole pick loop, headless, on synthetic data: what ``pupick demo`` (and the README's first command) runs.

Synthetic micrographs with known particles are written as MRC files; a sparse subset of the particles on a few
micrographs plays the part of a person's clicks; a picker is trained on them, picks every micrograph, and is
scored against every particle of micrographs it never saw labels on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "plot_picks"]


def plot_picks(image, picks, truth=None, match_radius=None, path=None, title=None):
    """Draw picks (circles) on a micrograph; with ``truth``, matched picks are green, false ones red and missed
    particles yellow. Returns the matplotlib Figure (saved to ``path`` when given)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    from napari_pupick.metrics import match_picks

    lo, hi = np.percentile(image, [1, 99])
    fig, ax = plt.subplots(figsize=(7, 7 * image.shape[0] / image.shape[1]), dpi=110)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    r = match_radius or 10
    if truth is not None and len(picks):
        hit = match_picks(picks, truth, r)
        colors = np.where(hit, "lime", "red")
    else:
        hit = np.zeros(len(picks), bool)
        colors = np.full(len(picks), "cyan")
    for (x, y), c in zip(picks[["x", "y"]].to_numpy(), colors):
        ax.add_patch(Circle((x, y), 2 * r, fill=False, color=c, lw=1.2))
    if truth is not None:
        found = np.zeros(len(truth), bool)
        if len(picks):
            # particles matched by some pick
            hit_t = match_picks(truth.assign(score=0.0), picks, r)
            found = hit_t
        missed = truth[~found]
        ax.scatter(missed["x"], missed["y"], marker="x", c="yellow", s=30, lw=1.2)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig


def run_demo(output="demo_out", n_micrographs=8, n_labels=40, seed=0, device="auto", progress=True,
             shape=(768, 768), radius=16.0, snr=0.1, **train_kwargs) -> dict:
    """Run the loop with the defaults a user gets and write everything to ``output``; returns the figures.

    Training gets what the shortest command gives it (micrographs, labels, radius): the binning, the particle count
    and the threshold are chosen by the package. Writes ``data/micrographs/*.mrc``, ``data/labels.star`` (the
    sparse clicks), ``data/particles.star`` (all particles), ``model.pt``, the picks above the model's threshold as
    ``picks.star``, ``picks.csv`` and ``picks_relion/`` (one STAR per micrograph), ``metrics.json`` and
    ``picks.png``.
    """
    from napari_pupick.io import read_micrograph, write_coordinates
    from napari_pupick.metrics import evaluate, match_picks
    from napari_pupick.pipeline import ALL_CANDIDATES, Picker, train_picker
    from napari_pupick.synthetic import make_synthetic

    say = print if progress else (lambda *a, **k: None)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    n_test = 2 if n_micrographs >= 4 else 1
    n_train = n_micrographs - n_test
    n_particles = 60
    synth = make_synthetic(n_micrographs=n_micrographs, shape=shape, n_particles=n_particles, radius=radius,
                           n_labels=n_labels, label_micrographs=max(1, n_train // 2), snr=snr, seed=seed)
    files = synth.write(out / "data")
    say(f"1/5 wrote {n_micrographs} synthetic micrographs ({shape[1]}x{shape[0]}, particle radius {radius:g} px) "
        f"and {len(synth.labels)} labels to {out / 'data'}")

    images = [read_micrograph(p) for p in files["micrographs"]]
    names = list(synth.names)
    train_names = names[:n_train]
    test_names = names[n_train:]
    t0 = time.perf_counter()
    say(f"2/5 training on {n_train} micrographs ({len(synth.labels)} labels, radius {radius:g} px; binning, "
        f"particle count and threshold chosen from the data)")
    ckpt = train_picker(images[:n_train], train_names, synth.labels, radius=radius, seed=seed, device=device,
                        progress=progress, log=say if progress else None, **train_kwargs)
    train_s = time.perf_counter() - t0
    ckpt.save(out / "model.pt")

    t0 = time.perf_counter()
    picker = Picker(ckpt, device=device)
    candidates = picker.pick_files(files["micrographs"], threshold=ALL_CANDIDATES)
    pick_s = time.perf_counter() - t0
    threshold = picker.threshold
    kept = candidates[candidates["score"] >= threshold].reset_index(drop=True)
    write_coordinates(kept, out / "picks.star")
    write_coordinates(kept, out / "picks.csv")
    write_coordinates(kept, out / "picks_relion", per_micrograph=True)
    say(f"3/5 picked {len(kept)} particles on {len(names)} micrographs in {pick_s:.1f} s (the model's threshold "
        f"{threshold:.2f}, edge margin {picker.margin:g} px) -> picks.star, picks.csv, picks_relion/")

    match_radius = radius / 2
    truth = synth.particles[synth.particles["micrograph"].isin(test_names)][["micrograph", "x", "y"]]
    result = evaluate(candidates[candidates["micrograph"].isin(test_names)], truth, match_radius, beta=1.0)
    result = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
              for k, v in result.items()}
    test_kept = kept[kept["micrograph"].isin(test_names)]
    tp = int(match_picks(test_kept, truth, match_radius).sum()) if len(test_kept) else 0
    precision = tp / len(test_kept) if len(test_kept) else 0.0
    recall = tp / len(truth) if len(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    result = {"ap": result["ap"], "best_f1": result["fbeta"], "best_f1_threshold": result["threshold"],
              "f1": f1, "precision": precision, "recall": recall, "threshold": threshold,
              "picks_on_test": int(len(test_kept)), "particles_on_test": int(len(truth)),
              "expected_particles": (ckpt.metrics or {}).get("expected_particles"),
              "downsample": picker.factor, "train_seconds": train_s, "pick_seconds": pick_s,
              "match_radius": match_radius, "test_micrographs": test_names, "n_labels": len(synth.labels)}
    from napari_pupick.io.atomic import write_json

    write_json(out / "metrics.json", result)
    say(f"4/5 on {len(test_names)} unseen micrographs: {len(test_kept)} picks for {len(truth)} particles, F1 {f1:.3f} "
        f"(precision {precision:.3f}, recall {recall:.3f}); average precision {result['ap']:.3f} over all "
        f"candidates (match radius {match_radius:g} px) -> metrics.json")

    name = test_names[0]
    plot_picks(images[n_train], kept[kept["micrograph"] == name], truth[truth["micrograph"] == name],
               match_radius=match_radius, path=out / "picks.png",
               title=f"{name}: green = correct pick, red = false pick, yellow x = missed particle")
    say(f"5/5 drew the picks on {name} -> {out / 'picks.png'}")
    return result
