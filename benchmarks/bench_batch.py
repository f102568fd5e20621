"""Batch picking throughput on dask.distributed (the "Batch picking" section of docs/benchmarks.md).

    python benchmarks/bench_batch.py                       # 20 micrographs of 2048 x 2048 (a few minutes)
    python benchmarks/bench_batch.py --n 200 --size 4096    # the issue's scale (about 6 GB of 16-bit MRC files)

Writes N synthetic 16-bit (uint16, MRC mode 6) micrographs into a temporary folder (deleted afterwards unless
--keep): two made by napari_pupick.synthetic, the others shifted copies of them with fresh Poisson noise, so the
folder is quick to make. The model is the general conv3 shipped with the package, binning by --bin (default 4,
particle radius 48 px), no TTA, threshold 0. For 1 and 2 worker processes (LocalCluster, one thread each) it
measures micrographs per second, each worker's peak resident memory (VmHWM), and the share of worker time
outside scoring (reading, binning and normalizing, extraction, and what the workers did not spend in a task:
scheduling, transfers, waiting) plus the client's writing time. Then a run interrupted halfway (by the first
micrograph after N/2 done) and resumed: how many micrographs the resume redid, and its time against a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PUPICK_THREADS", "1")


def make_folder(folder: Path, n: int, size: int, radius: float, seed: int = 0) -> list[Path]:
    import mrcfile
    import numpy as np

    from napari_pupick.synthetic import make_synthetic

    base = make_synthetic(n_micrographs=2, shape=(size, size), n_particles=int(0.35 * (size / radius) ** 2 / 4),
                          radius=radius, snr=0.2, seed=seed).micrographs
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.roll(base[i % 2], shift=(int(rng.integers(size)), int(rng.integers(size))), axis=(0, 1))
        lo, hi = np.percentile(img, [0.1, 99.9])
        counts = rng.poisson(np.clip((img - lo) / (hi - lo), 0, 1) * 40.0 + 5.0).astype(np.uint16)
        path = folder / f"mic_{i:04d}.mrc"
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(counts)
            mrc.voxel_size = 1.0
        paths.append(path)
    return paths


def make_model(path: Path, factor: int, radius: float) -> Path:
    from napari_pupick.pipeline import resolve_init

    general = resolve_init("general", "conv3")
    general.preprocess = {"downsample": int(factor), "method": "affine", "gmm": None}
    general.config = {**(general.config or {}), "particle_radius": radius / factor}
    general.metrics = {"threshold": 0.0, "margin": radius, "tta": False}
    return general.save(path)


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM, the high-water mark of its own address space.

    Not ``ru_maxrss``: Linux carries that across fork and exec, so a worker spawned by a client that had just made
    the micrographs reports the client's peak (1407 MB here), not its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run(model, paths, out, workers, on_result=None):
    from napari_pupick.batch import close_client, run_batch, start_client

    client = start_client(workers)
    client.wait_for_workers(workers, timeout=120)
    try:
        t0 = time.perf_counter()
        result = run_batch(model, paths, out, combined=out.parent / f"{out.name}.star", client=client,
                           on_result=on_result)
        wall = time.perf_counter() - t0
        rss = sorted(client.run(peak_rss_mb).values())
    finally:
        close_client(client)
    return result, wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="micrographs [default: 20]")
    ap.add_argument("--size", type=int, default=2048, help="micrograph side in pixels [default: 2048]")
    ap.add_argument("--radius", type=float, default=48.0, help="particle radius, pixels [default: 48]")
    ap.add_argument("--bin", type=int, default=4, help="binning of the model [default: 4]")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts [default: 1 2]")
    ap.add_argument("--folder", default=None, help="work folder [default: a temporary one]")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    import logging

    logging.getLogger("distributed").setLevel(logging.CRITICAL)  # closing clusters logs lost heartbeats

    root = Path(args.folder or tempfile.mkdtemp(prefix="pupick_bench_batch_"))
    figures = {"n": args.n, "size": args.size, "bin": args.bin, "cpus": os.cpu_count(), "runs": []}
    try:
        t0 = time.perf_counter()
        paths = make_folder(root / "micrographs", args.n, args.size, args.radius)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.n} micrographs of {args.size} x {args.size} uint16 ({mb:.0f} MB) in {time.perf_counter() - t0:.0f} s")
        model = make_model(root / "model.pt", args.bin, args.radius)
        for w in args.workers:
            out = root / f"w{w}"
            result, wall, rss = run(model, paths, out, w)
            t = result.timings
            task = sum(t[k] for k in ("read", "prepare", "score", "extract"))
            outside = 1.0 - t["score"] / (wall * w)
            row = {"workers": w, "wall_s": wall, "mic_per_s": args.n / wall, "peak_rss_mb": rss,
                   "share_outside_scoring": outside, "timings_s": t, "idle_or_scheduling_s": wall * w - task,
                   "picks": result.n_picks, "failed": len(result.failed)}
            figures["runs"].append(row)
            print(f"{w} worker(s): {wall:.1f} s, {args.n / wall:.2f} mic/s, peak RSS per worker "
                  f"{', '.join(f'{r:.0f}' for r in rss)} MB, {100 * outside:.0f}% of worker time outside scoring "
                  f"(read {t['read']:.1f} s, bin+normalize {t['prepare']:.1f} s, score {t['score']:.1f} s, "
                  f"extract {t['extract']:.1f} s; client writing {t['write']:.1f} s), {result.n_picks} picks")
            shutil.rmtree(out)
        # interrupted halfway, then resumed (with the most workers)
        w = max(args.workers)
        out = root / "resume"
        seen = []

        def stop(item, res):
            seen.append(item.path)
            if len(seen) == args.n // 2:
                raise KeyboardInterrupt

        try:
            run(model, paths, out, w, on_result=stop)
        except KeyboardInterrupt:
            pass
        result, wall, _ = run(model, paths, out, w)
        full = next(r["wall_s"] for r in figures["runs"] if r["workers"] == w)
        figures["resume"] = {"workers": w, "written_before": args.n // 2, "skipped": len(result.skipped),
                             "redone": len(result.done), "wall_s": wall, "full_run_wall_s": full}
        print(f"resume after {args.n // 2} of {args.n} written ({w} workers): skipped {len(result.skipped)}, redid "
              f"{len(result.done)}, {wall:.1f} s (a full run: {full:.1f} s)")
        if len(figures["runs"]) > 1:
            one = next((r for r in figures["runs"] if r["workers"] == 1), None)
            two = next((r for r in figures["runs"] if r["workers"] == 2), None)
            if one and two:
                figures["speedup_2_vs_1"] = one["wall_s"] / two["wall_s"]
                print(f"2 workers / 1 worker: {figures['speedup_2_vs_1']:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
