"""napari-pupick against Topaz 0.3.20, side by side on the same data, labels, radius, split and threads.

    bash benchmarks/topaz/setup_topaz.sh                      # once: Topaz in its own venv (a peer, not a dependency)
    python benchmarks/race.py all                              # synthetic, apoferritin, ribosome in one run
    python benchmarks/race.py apoferritin --topaz-variants scratch   # one set, Topaz from scratch only
    python benchmarks/race.py all --normalize-only             # the normalization stage alone, about a minute
    python benchmarks/race.py apoferritin --reuse-topaz /work/bench_out/topaz   # reuse Topaz's JSON of an earlier run
    python benchmarks/race.py cryoppp --quality                # picks only: Topaz at 600 updates against our
                                                               # shortest command, from scratch and general

Per stage, for both tools: median wall and CPU time per micrograph and peak memory (normalization; scoring;
extraction), training wall time, examples per second, and the wall time our training needs to reach Topaz's
final held-out AP; then AP and precision at 90% recall, all evaluated by the same code
(``benchmarks/topaz/run_topaz.evaluate_all``: ``napari_pupick.metrics`` against EVERY particle of the held-out
micrographs, match radius = half the particle radius).

Each of our stages runs in a fresh process (like each Topaz command), with one torch thread unless ``--threads``.
Training examples: Topaz counts one example per 71-pixel region of its minibatch (256 per step); ours counts every
output cell of a step's tiles that enters the loss (each is one region's logit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "topaz"))

import numpy as np  # noqa: E402


def _in_fresh_process(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _limit(threads):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stage_normalize(ds, threads):
    """Per-micrograph normalization times, each including reading the file and writing the result (as Topaz's
    per-micrograph progress interval does).

    - ``own fit``: read, Fourier binning, a mixture fitted to this micrograph alone, normalize, write an MRC: what
      ``topaz preprocess`` does for each micrograph.
    - ``dataset-wide`` (what ``pupick normalize`` and training do): one pass reading and binning every micrograph,
      one shared mixture fitted on all, then normalize and write each; total wall time / micrographs.
    """
    import tempfile

    _limit(threads)
    from napari_pupick.io import read_micrograph, write_micrograph
    from napari_pupick.preprocess import Preprocessor, downsample, fit_gmm, gmm_normalize

    paths = list(ds.micrograph_paths())
    read_micrograph(paths[0])  # warm-up (imports, page cache), like Topaz's first-interval exclusion
    base = _peak_mb()
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(paths):
            w0, c0 = time.perf_counter(), _cpu()
            b = downsample(read_micrograph(path), ds.downsample)
            fit = fit_gmm([b])
            out = gmm_normalize(b, fit.gmm, fit.scales[0])
            write_micrograph(os.path.join(tmp, f"{i}.mrc"), out)
            walls.append(time.perf_counter() - w0)
            cpus.append(_cpu() - c0)
        w0, c0 = time.perf_counter(), _cpu()
        pre = Preprocessor(downsample=ds.downsample, method="gmm")
        for i, out in enumerate(pre.fit_transform(read_micrograph(p) for p in paths)):
            write_micrograph(os.path.join(tmp, f"s{i}.mrc"), out)
        shared_wall = (time.perf_counter() - w0) / len(paths)
        shared_cpu = (_cpu() - c0) / len(paths)
    raws = [read_micrograph(p) for p in paths[:3]]
    deterministic = all(
        np.array_equal(Preprocessor(downsample=ds.downsample).fit(raws).transform(raws[0]),
                       Preprocessor(downsample=ds.downsample).fit(raws).transform(raws[0])) for _ in range(2))
    return dict(median_wall_per_micrograph_s=float(np.median(walls)),
                median_cpu_per_micrograph_s=float(np.median(cpus)),
                shared_fit_wall_per_micrograph_s=shared_wall, shared_fit_cpu_per_micrograph_s=shared_cpu,
                peak_rss_mb=_peak_mb(), peak_rss_increase_mb=_peak_mb() - base,
                deterministic=bool(deterministic), n_micrographs=len(paths))


def stage_train(ds, threads, seed, out_path, train_kw):
    """Train on the training micrographs; AP on the held-out ones after every epoch, against ALL their particles."""
    _limit(threads)
    import pandas as pd

    from napari_pupick.io import read_micrograph
    from napari_pupick.pipeline import training_run

    labels = ds.labels()
    truth = ds.particles(ds.heldout)
    names = list(ds.train) + list(ds.heldout)
    raws = [read_micrograph(p) for p in ds.micrograph_paths(names)]
    # held-out micrographs are never trained on; their (complete) particles only serve as truth for the AP
    trainer = training_run(raws, names, pd.concat([labels, truth], ignore_index=True), radius=ds.radius,
                           downsample=ds.downsample, expected_particles=ds.expected_particles(),
                           holdout=list(ds.heldout), seed=seed, device="cpu", threads=threads, **train_kw)
    w0, c0 = time.perf_counter(), _cpu()
    eval_s = 0.0
    t_last_step = w0
    curve, examples, steps = [], 0, 0
    for ev in trainer.run():
        now = time.perf_counter()
        if ev.kind == "step":
            t_last_step = now
            steps = ev.step
            examples = getattr(ev, "examples", None) or examples
        elif ev.kind == "epoch":
            eval_s += now - t_last_step
            curve.append(dict(epoch=ev.epoch, step=ev.step, train_wall_s=now - w0 - eval_s, ap=ev.heldout_ap,
                              examples_per_s=getattr(ev, "examples_per_s", None)))
    wall = time.perf_counter() - w0
    cpu = _cpu() - c0
    # the LAST model, as Topaz's: the per-epoch AP above uses the held-out truth, so choosing the best epoch by it
    # would leak the test set into the final figures
    trainer.latest.save(out_path)
    eps = [c["examples_per_s"] for c in curve if c.get("examples_per_s")]
    return dict(wall_s=wall, train_wall_s=wall - eval_s, eval_s=eval_s, cpu_s=cpu, steps=steps,
                examples_per_s=float(np.median(eps)) if eps else None, curve=curve, peak_rss_mb=_peak_mb(),
                config=trainer.config.to_dict() if hasattr(trainer.config, "to_dict") else None)


def stage_pick(ds, threads, model_path, threshold=-6.0):
    """Score and extract every held-out micrograph: per-micrograph times, peak memory, the picks."""
    _limit(threads)
    from napari_pupick.io import micrograph_name, read_micrograph
    from napari_pupick.pipeline import Picker, _concat

    picker = Picker(model_path, device="cpu")
    paths = ds.micrograph_paths(ds.heldout)
    raws = [read_micrograph(p) for p in paths]
    prepared = [picker.prepare(r) for r in raws]
    picker.score(prepared[0], prepared=True)  # warm-up (allocator, kernels), like Topaz's first-item exclusion
    base = _peak_mb()
    score_w, score_c, ext_w, ext_c, tables = [], [], [], [], []
    for path, x in zip(paths, prepared):
        w0, c0 = time.perf_counter(), _cpu()
        logits = picker.score(x, prepared=True)
        w1, c1 = time.perf_counter(), _cpu()
        tables.append(picker.extract(logits, micrograph_name(path), radius=ds.radius, threshold=threshold))
        ext_w.append(time.perf_counter() - w1)
        ext_c.append(_cpu() - c1)
        score_w.append(w1 - w0)
        score_c.append(c1 - c0)
    picks = _concat(tables)
    return dict(score_median_wall_s=float(np.median(score_w)), score_median_cpu_s=float(np.median(score_c)),
                extract_median_wall_s=float(np.median(ext_w)), extract_median_cpu_s=float(np.median(ext_c)),
                peak_rss_mb=_peak_mb(), peak_rss_increase_mb=_peak_mb() - base,
                binned_shape=list(prepared[0].shape), picks=picks.to_dict("list"))


def stage_score_1024(threads, model_path):
    """Scoring + extraction of one 1024 x 1024 (network-input) micrograph: the issue's reference size."""
    _limit(threads)
    from napari_pupick.pipeline import Picker
    from napari_pupick.synthetic import make_synthetic

    picker = Picker(model_path, device="cpu")
    x = make_synthetic(n_micrographs=1, shape=(1024, 1024), seed=5).micrographs[0]
    x = (x - x.mean()) / x.std()
    picker.score(x, prepared=True)
    base = _peak_mb()
    walls = []
    for _ in range(5):
        w0 = time.perf_counter()
        logits = picker.score(x, prepared=True)
        picker.extract(logits, "m", radius=picker.particle_radius, threshold=-6.0)
        walls.append(time.perf_counter() - w0)
    return dict(median_wall_s=float(np.median(walls)), peak_rss_mb=_peak_mb(), peak_rss_increase_mb=_peak_mb() - base)


def run_ours(ds, workdir, threads=1, seed=0, train_kw=None) -> dict:
    import pandas as pd

    from run_topaz import evaluate_all

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "pupick_model.pt"
    out = dict(tool="napari-pupick")
    out["normalize"] = _in_fresh_process(stage_normalize, ds, threads)
    out["train"] = _in_fresh_process(stage_train, ds, threads, seed, str(model), train_kw or {})
    pick = _in_fresh_process(stage_pick, ds, threads, str(model))
    picks = pd.DataFrame(pick.pop("picks"))
    out["pick"] = pick
    out["score_1024"] = _in_fresh_process(stage_score_1024, threads, str(model))
    out["evaluation"] = evaluate_all(picks, ds, margins=(0.0, ds.radius))
    picks.to_csv(workdir / "picks_pupick.csv", index=False)
    return out


def _fmt(v, nd=3):
    if v is None:
        return "-"
    return f"{v:.{nd}g}" if isinstance(v, float) else str(v)


def table(ds, ours, topaz: dict) -> str:
    """The markdown table of the race."""
    rows = ["| stage | napari-pupick | " + " | ".join(f"Topaz ({k})" for k in topaz)
            + " | ratio (Topaz scratch / ours) |",
            "|---|---|" + "---|" * len(topaz) + "---|"]
    ref = topaz.get("scratch") or next(iter(topaz.values()), None)

    def add(label, mine, theirs_fn, nd=3, ratio=True):
        vals = [theirs_fn(t) for t in topaz.values()]
        r = theirs_fn(ref) / mine if (ratio and ref and mine and theirs_fn(ref)) else None
        rows.append(f"| {label} | {_fmt(mine, nd)} | " + " | ".join(_fmt(v, nd) for v in vals)
                    + f" | {_fmt(r, 3) + 'x' if r else '-'} |")

    st = lambda t, s, k: (t.get("stages", {}).get(s) or {}).get(k)  # noqa: E731
    add("normalize, own mixture per micrograph, s/micrograph (median wall)",
        ours["normalize"]["median_wall_per_micrograph_s"],
        lambda t: st(t, "preprocess", "median_wall_per_micrograph_s"))
    add("normalize, dataset-wide mixture (`pupick normalize`), s/micrograph", ours["normalize"].get(
        "shared_fit_wall_per_micrograph_s"), lambda t: st(t, "preprocess", "median_wall_per_micrograph_s"))
    add("normalize, peak MB", ours["normalize"]["peak_rss_mb"], lambda t: st(t, "preprocess", "peak_rss_mb"),
        ratio=False)
    add("train, wall s", ours["train"]["wall_s"], lambda t: st(t, "train", "wall_s"))
    add("train, CPU s", ours["train"]["cpu_s"], lambda t: st(t, "train", "cpu_s"))
    add("train, examples/s", ours["train"]["examples_per_s"], lambda t: st(t, "train", "examples_per_s_steady"),
        ratio=False)
    add("train, peak MB", ours["train"]["peak_rss_mb"], lambda t: st(t, "train", "peak_rss_mb"), ratio=False)
    add("score, s/micrograph (median wall)", ours["pick"]["score_median_wall_s"],
        lambda t: st(t, "score", "median_wall_per_micrograph_s"))
    add("extract, s/micrograph (median wall)", ours["pick"]["extract_median_wall_s"],
        lambda t: st(t, "extract", "median_wall_per_micrograph_s"))
    add("score+extract peak MB", ours["pick"]["peak_rss_mb"], lambda t: st(t, "score", "peak_rss_mb"), ratio=False)
    for m in (0.0, ds.radius):
        key = f"margin_{m:g}"
        add(f"AP (edge margin {m:g} px)", ours["evaluation"][key]["ap"],
            lambda t: t.get("evaluation", {}).get(key, {}).get("ap"), ratio=False)
        add(f"precision at 90% recall (margin {m:g})", ours["evaluation"][key]["precision_at_90"],
            lambda t: t.get("evaluation", {}).get(key, {}).get("precision_at_90"), ratio=False)
    return "\n".join(rows)


def time_to_reach(curve, target):
    """Training wall time (evaluation passes excluded) at the first epoch whose held-out AP >= target."""
    for c in curve:
        if c["ap"] is not None and c["ap"] >= target:
            return c["train_wall_s"]
    return None


def race_one(name, args, argv_text) -> str:
    """Topaz (each variant), then ours, on one dataset; writes race_<name>.md/.json and returns the markdown."""
    import common

    out = Path(args.out)
    ds = common.get_dataset(name, workdir=out)
    topaz = {}
    for variant in args.topaz_variants.split(","):
        if args.reuse_topaz:
            topaz[variant] = json.loads((Path(args.reuse_topaz) / f"{ds.name}_{variant}_t1.json").read_text())
        else:
            from run_topaz import run_topaz_pipeline

            topaz[variant] = run_topaz_pipeline(ds, out / "topaz" / ds.name, threads=args.threads,
                                                pretrained=variant == "pretrained", epochs=args.topaz_epochs,
                                                epoch_size=args.topaz_epoch_size, margins=(0.0, ds.radius))
    ours = run_ours(ds, out / "pupick" / ds.name, threads=args.threads, seed=args.seed)
    md = table(ds, ours, topaz)
    lines = [f"## {ds.name}: napari-pupick vs Topaz 0.3.20 ({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} "
             f"thread(s), `python benchmarks/race.py {argv_text}`)", "", md, ""]
    for variant, t in topaz.items():
        ap_t = t.get("evaluation", {}).get("margin_0", {}).get("ap")
        reach = time_to_reach(ours["train"]["curve"], ap_t) if ap_t is not None else None
        t_wall = (t.get("stages", {}).get("train") or {}).get("wall_s")
        lines.append(f"- Topaz {variant}: final AP {_fmt(ap_t)} after {_fmt(t_wall, 4)} s of training; "
                     f"ours reaches it "
                     f"after {_fmt(reach, 3)} s of training"
                     + (f" ({t_wall / reach:.0f}x less)" if reach and t_wall else " (not reached)") + ".")
        load = (t.get("stages", {}).get("train") or {}).get("load_avg_1min")
        if load is not None:
            lines.append(f"  Machine load (1-min average) during Topaz {variant} training: {load:.2f}.")
    s1024 = ours["score_1024"]
    lines.append(f"- Scoring + extraction of a 1024 x 1024 network-input micrograph (ours): median "
                 f"{s1024['median_wall_s']:.3f} s, peak RSS {s1024['peak_rss_mb']:.0f} MB.")
    lines.append(f"- Our normalization is deterministic: {ours['normalize']['deterministic']}; per-epoch held-out AP "
                 f"(ours): " + ", ".join(f"{c['ap']:.3f} @ {c['train_wall_s']:.0f} s" for c in ours["train"]["curve"]
                                         if c["ap"] is not None))
    text = "\n".join(lines)
    (out / f"race_{ds.name}.md").write_text(text + "\n")
    (out / f"race_{ds.name}.json").write_text(json.dumps(dict(ours=ours, topaz=topaz), indent=2, default=str))
    return text


def quality_race(names, args, argv_text) -> str:
    """Quality only, as each tool's user gets it: Topaz run as documented (``topaz train`` for
    ``--topaz-epochs x --topaz-epoch-size`` updates, ``-r 3``, GE-binomial, the true count, ``extract -t -6``)
    against our shortest command (micrographs, labels, radius) from a random start and from the general model.
    Both get the same labels; every candidate is scored against every held-out particle. Our F1 at the model's
    own threshold is what ``pupick extract`` writes; Topaz has no calibrated threshold (its documented extract
    keeps every candidate down to -6 and leaves the cut to the user), so only its AP and best F1 are shown."""
    import pandas as pd

    import common
    from bench_defaults import run_one, score_picks

    out = Path(args.out)
    rows = ["| dataset | picker | training wall s | AP | best F1 | F1 at the default threshold |",
            "|---|---|---|---|---|---|"]
    results = []
    for name in names:
        ds = common.get_dataset(name, workdir=out)
        truth = ds.particles(ds.heldout)
        for variant in [v for v in args.topaz_variants.split(",") if v]:
            from run_topaz import run_topaz_pipeline

            t = run_topaz_pipeline(ds, out / "topaz" / ds.name, threads=args.threads,
                                   pretrained=variant == "pretrained", epochs=args.topaz_epochs,
                                   epoch_size=args.topaz_epoch_size, margins=(0.0,))
            picks = pd.read_csv(t["picks_path"], dtype={"micrograph": str})
            sc = score_picks(picks, truth, ds.match_radius, -6.0)
            wall = (t.get("stages", {}).get("train") or {}).get("wall_s")
            results.append(dict(dataset=ds.name, picker=f"Topaz 0.3.20 {variant}", train_wall_s=wall, **sc))
            rows.append(f"| {ds.name} | Topaz 0.3.20, {variant}, {args.topaz_epochs * args.topaz_epoch_size} updates "
                        f"| {_fmt(wall, 3)} | {sc['ap']:.3f} | {sc['best_f1']:.3f} | - |")
        for init in [i for i in args.inits.split(",") if i]:
            r = _in_fresh_process(run_one, name, args.seed, ds.n_labels, {"init": init})
            results.append(dict(picker=f"napari-pupick init {init}", **r))
            rows.append(f"| {ds.name} | napari-pupick, shortest command, `--init {init}` | {r['train_s']:.0f} | "
                        f"{r['ap']:.3f} | {r['best_f1']:.3f} | {r['f1_default']:.3f} |")
    return _report(out, "quality", "Picks against Topaz", rows, results, args, argv_text)


def normalize_only(names, args, argv_text) -> str:
    """Only the normalization stage, both tools, every dataset: a short run (about a minute) for a quiet machine."""
    import common
    from run_topaz import preprocess

    out = Path(args.out)
    rows = ["| dataset | micrograph, binning | Topaz `preprocess`, s/micrograph (median wall) "
            "| ours, own mixture per "
            "micrograph | ratio | ours, dataset-wide mixture (`pupick normalize`) | ratio |",
            "|---|---|---|---|---|---|---|"]
    results = {}
    for name in names:
        ds = common.get_dataset(name, workdir=out)
        theirs = preprocess(ds, out / "topaz_normalize" / ds.name, threads=args.threads)
        ours = _in_fresh_process(stage_normalize, ds, args.threads)
        results[name] = dict(topaz=theirs, ours=ours)
        t = theirs["median_wall_per_micrograph_s"]
        own, shared = ours["median_wall_per_micrograph_s"], ours["shared_fit_wall_per_micrograph_s"]
        shape = _mrc_shape(ds.micrograph_paths()[0])
        rows.append(f"| {ds.name} ({ours['n_micrographs']}) | {shape[1]} x {shape[0]}, {ds.downsample} | {t:.3f} | "
                    f"{own:.4f} | {t / own:.1f}x | {shared:.4f} | {t / shared:.1f}x |")
    return _report(out, "normalize", "Normalization only", rows, results, args, argv_text)


def _report(out, tag, title, rows, results, args, argv_text) -> str:
    """Write race_<tag>.md (a headed markdown table) and race_<tag>.json; return the markdown."""
    text = "\n".join([f"## {title} ({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} thread(s), "
                      f"`python benchmarks/race.py {argv_text}`)", "", *rows, ""])
    (out / f"race_{tag}.md").write_text(text)
    (out / f"race_{tag}.json").write_text(json.dumps(results, indent=2, default=str))
    return text


def _mrc_shape(path):
    import mrcfile

    with mrcfile.open(path, header_only=True, permissive=True) as mrc:
        return int(mrc.header.ny), int(mrc.header.nx)


def main(argv=None):
    import common

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", choices=list(common.DATASETS) + ["all"],
                   help="one or more datasets, or 'all' (synthetic, apoferritin, ribosome)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topaz-variants", default="scratch,pretrained")
    p.add_argument("--topaz-epochs", type=int, default=4, help="Topaz epochs [default: 4]")
    p.add_argument("--topaz-epoch-size", type=int, default=150,
                   help="Topaz updates per epoch [default: 150, so 600 updates in all]")
    p.add_argument("--reuse-topaz", default=None, help="folder with run_topaz.py's <dataset>_<variant>_t1.json")
    p.add_argument("--out", default="bench_out/race")
    p.add_argument("--normalize-only", action="store_true",
                   help="measure only the normalization stage of both tools (about a minute)")
    p.add_argument("--quality", action="store_true",
                   help="picks only: Topaz as documented against our shortest command (see quality_race)")
    p.add_argument("--inits", default="none,general", help="--quality: where our training starts")
    args = p.parse_args(argv)
    names = list(common.DATASETS) if "all" in args.datasets else args.datasets
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    argv_text = " ".join(argv or sys.argv[1:])
    if args.normalize_only:
        print(normalize_only(names, args, argv_text))
        return
    if args.quality:
        print(quality_race(names, args, argv_text))
        return
    texts = []
    for name in names:
        texts.append(race_one(name, args, argv_text))
        print(texts[-1], flush=True)
    (out / "race.md").write_text("\n\n".join(texts) + "\n")


if __name__ == "__main__":
    main()
