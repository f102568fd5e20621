"""CPU time of the core operations, one thread, median of repeats (the "Core operations" table of docs/benchmarks.md).

    python benchmarks/bench_core.py            # about a minute

Measures: Fourier downsampling; the GMM fit + normalization of one micrograph (synthetic 1024 x 1024 and the real
apoferritin micrographs binned by 4); normalizing a new micrograph with a fitted mixture (scale estimate +
normalize); exact NMS on a 1024 x 1024 score map; evaluation of a pick table. CPU time (``time.process_time``)
is used so that other jobs on the machine change the figures little.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def cpu_median(fn, args_list, repeat: int = 1) -> float:
    """Median CPU seconds of ``fn(*args)`` over ``args_list`` (each repeated ``repeat`` times)."""
    times = []
    for args in args_list:
        for _ in range(repeat):
            t0 = time.process_time()
            fn(*args)
            times.append(time.process_time() - t0)
    return float(np.median(times))


def main() -> None:
    import pandas as pd

    import common
    from napari_pupick.extract import extract_picks
    from napari_pupick.io import read_micrograph
    from napari_pupick.metrics import evaluate
    from napari_pupick.preprocess import downsample, estimate_scale, fit_gmm, gmm_normalize
    from napari_pupick.synthetic import make_synthetic

    rows = []
    rng = np.random.default_rng(0)
    syn = make_synthetic(n_micrographs=4, shape=(1024, 1024), n_particles=200, radius=12, seed=0)
    big = rng.normal(size=(4096, 4096)).astype(np.float32)
    rows.append(("Fourier downsample 1024 x 1024 by 2", cpu_median(downsample, [(m, 2) for m in syn.micrographs], 3)))
    rows.append(("Fourier downsample 4096 x 4096 by 4", cpu_median(downsample, [(big, 4)], 3)))

    def fit_and_normalize(image):
        fit = fit_gmm([image])
        return gmm_normalize(image, fit.gmm, fit.scales[0])

    rows.append(("GMM fit + normalize, one synthetic 1024 x 1024 micrograph",
                 cpu_median(fit_and_normalize, [(m,) for m in syn.micrographs], 3)))
    shared = fit_gmm(syn.micrographs).gmm
    rows.append(("new micrograph with a fitted mixture (scale estimate + normalize), 1024 x 1024",
                 cpu_median(lambda m: gmm_normalize(m, shared, estimate_scale(m, shared)),
                            [(m,) for m in syn.micrographs], 3)))

    apo = common.get_dataset("apoferritin")
    raws = [read_micrograph(p) for p in apo.micrograph_paths()]
    rows.append(("apoferritin 1240 x 1200 uint16: Fourier downsample by 4",
                 cpu_median(downsample, [(r, 4) for r in raws])))
    binned = [downsample(r, 4) for r in raws]
    rows.append(("apoferritin binned 310 x 300: GMM fit + normalize of one micrograph",
                 cpu_median(fit_and_normalize, [(b,) for b in binned])))
    t0 = time.process_time()
    fit = fit_gmm(binned)
    for b, a in zip(binned, fit.scales):
        gmm_normalize(b, fit.gmm, a)
    rows.append((f"apoferritin binned: one mixture for all {len(binned)} micrographs + normalize, per micrograph",
                 (time.process_time() - t0) / len(binned)))

    # a score map with ~7k local maxima above threshold: smooth noise
    from scipy.ndimage import gaussian_filter

    score = gaussian_filter(rng.normal(size=(1024, 1024)).astype(np.float32), 2) * 20
    rows.append(("exact NMS on a 1024 x 1024 map, threshold -6, radius 10",
                 cpu_median(lambda s: extract_picks(s, radius=10, threshold=-6.0), [(score,)], 5)))
    truth = syn.particles[["micrograph", "x", "y"]]
    noise = pd.DataFrame({"micrograph": np.repeat(syn.names, 5000), "x": rng.uniform(0, 1023, 20000),
                          "y": rng.uniform(0, 1023, 20000), "score": rng.normal(size=20000)})
    picks = pd.concat([truth.assign(score=rng.normal(2, 1, len(truth))), noise], ignore_index=True)
    rows.append((f"evaluate {len(picks)} picks against {len(truth)} particles on {len(syn.names)} micrographs",
                 cpu_median(lambda p: evaluate(p, truth, 6.0), [(picks,)], 5)))

    print("| operation | CPU time, median (ms) |")
    print("|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1000:.1f} |")


if __name__ == "__main__":
    main()
