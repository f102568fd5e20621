"""Benchmark datasets shared by napari-pupick's and Topaz's runs: where the data are, how they are split, and the
sparse labels both tools get.

Every dataset is a micrograph folder plus a table of ALL particles (the ground truth) in original micrograph
pixels (x = column, y = row), a particle radius, a downsampling factor, and a split by micrograph:

- ``train``: micrographs the labels are drawn from (and the only ones a picker trains on);
- ``valid``: micrographs a trainer may watch during training (empty: it watches ``heldout``);
- ``heldout``: micrographs picks are evaluated on, against all their particles.

The labels a person would have clicked are ``sample_labels(particles, train, n_labels, seed)``: the same function,
seed and count for every tool, so both see exactly the same clicks.

>>> ds = get_dataset("apoferritin")                       # doctest: +SKIP
>>> labels = ds.labels()                                  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "Dataset",
    "DATASETS",
    "data_root",
    "apoferritin",
    "ribosome",
    "cryoppp",
    "synthetic",
    "get_dataset",
    "sample_labels",
    "read_particles",
]

COLUMNS = ["micrograph", "x", "y"]


def data_root() -> Path:
    """The shared real-data folder: ``$PUPICK_DATA``, else ``shared/data`` beside the repository."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("PUPICK_DATA", default))


def read_particles(path) -> pd.DataFrame:
    """Read a Topaz-style tab-separated coordinate file (``image_name x_coord y_coord [score]``).

    Returns a DataFrame with columns ``micrograph, x, y`` (float, original pixels).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: particle coordinate file not found")
    table = pd.read_csv(path, sep="\t", dtype={"image_name": str})
    missing = {"image_name", "x_coord", "y_coord"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)} (expected image_name, x_coord, y_coord)")
    out = pd.DataFrame({"micrograph": table["image_name"].astype(str), "x": table["x_coord"].astype(float),
                        "y": table["y_coord"].astype(float)})
    return out


def sample_labels(particles: pd.DataFrame, train_names, n: int, seed: int = 0) -> pd.DataFrame:
    """Draw ``n`` sparse labels at random from the particles of the training micrographs.

    Parameters
    ----------
    particles : DataFrame
        All particles, columns ``micrograph, x, y`` (more columns are dropped), shape (P, >=3).
    train_names : sequence of str
        Micrographs the labels may come from.
    n : int
        How many labels; all available ones when there are fewer.
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same labels.

    Returns
    -------
    DataFrame
        ``min(n, P_train)`` rows, columns ``micrograph, x, y``, sorted by micrograph then original row order.
    """
    names = [str(m) for m in train_names]
    pool = particles[particles["micrograph"].astype(str).isin(names)].reset_index(drop=True)
    if len(pool) == 0:
        raise ValueError(f"no particles on the training micrographs {names[:5]}...")
    k = min(int(n), len(pool))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(pool), size=k, replace=False))
    picked = pool.iloc[rows][COLUMNS].copy()
    picked["_order"] = picked["micrograph"].map({m: i for i, m in enumerate(names)})
    picked = picked.sort_values(["_order"], kind="stable").drop(columns="_order")
    return picked.reset_index(drop=True)


@dataclass(frozen=True)
class Dataset:
    """One benchmark dataset.

    Attributes
    ----------
    name : str
        Short name (``apoferritin``, ``ribosome``, ``synthetic``).
    micrograph_dir : Path
        Folder with one ``<micrograph>.mrc`` per micrograph.
    particles_path : Path
        Topaz-style coordinate file with ALL particles (original pixels).
    radius : float
        Particle radius in original pixels.
    downsample : int
        Binning factor both tools use.
    train, valid, heldout : tuple of str
        Micrograph names of each split (see the module docstring).
    n_labels, label_seed : int
        Arguments of ``sample_labels``.
    """

    name: str
    micrograph_dir: Path
    particles_path: Path
    radius: float
    downsample: int
    train: tuple
    heldout: tuple
    valid: tuple = ()
    n_labels: int = 100
    label_seed: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def names(self) -> list:
        """All micrographs of the dataset: train, valid, then held-out."""
        return list(self.train) + list(self.valid) + list(self.heldout)

    @property
    def match_radius(self) -> float:
        """Match radius for evaluation, original pixels: half the particle radius."""
        return self.radius / 2.0

    @property
    def binned_radius(self) -> int:
        """Particle radius on the binned images, rounded (Topaz takes integer radii)."""
        return max(1, int(round(self.radius / self.downsample)))

    @property
    def watch(self) -> tuple:
        """Micrographs a trainer watches during training: ``valid`` if any, else ``heldout``."""
        return self.valid if self.valid else self.heldout

    def micrograph_path(self, name: str) -> Path:
        return Path(self.micrograph_dir) / f"{name}.mrc"

    def micrograph_paths(self, names=None) -> list:
        """Paths of ``names`` (default: all micrographs)."""
        return [self.micrograph_path(n) for n in (self.names if names is None else names)]

    def particles(self, names=None) -> pd.DataFrame:
        """All ground-truth particles (of ``names`` only, if given): columns ``micrograph, x, y``."""
        table = read_particles(self.particles_path)
        if names is not None:
            table = table[table["micrograph"].isin([str(n) for n in names])].reset_index(drop=True)
        return table

    def labels(self) -> pd.DataFrame:
        """The sparse labels every tool gets: ``sample_labels(particles, train, n_labels, label_seed)``."""
        return sample_labels(self.particles(), self.train, self.n_labels, self.label_seed)

    def expected_particles(self) -> int:
        """Expected particles per micrograph: the mean ground-truth count over the training micrographs."""
        counts = self.particles(self.train).groupby("micrograph").size()
        return int(round(float(counts.reindex(list(self.train), fill_value=0).mean())))

    def with_labels(self, n_labels: int, label_seed: int | None = None) -> "Dataset":
        """A copy with another label count (and seed)."""
        return replace(self, n_labels=int(n_labels),
                       label_seed=self.label_seed if label_seed is None else int(label_seed))

    def describe(self) -> dict:
        """A JSON-able summary."""
        return dict(name=self.name, micrograph_dir=str(self.micrograph_dir), particles=str(self.particles_path),
                    radius=self.radius, downsample=self.downsample, binned_radius=self.binned_radius,
                    match_radius=self.match_radius, train=list(self.train), valid=list(self.valid),
                    heldout=list(self.heldout), n_labels=self.n_labels, label_seed=self.label_seed,
                    notes=self.notes)


def apoferritin(root=None, n_labels: int = 100, label_seed: int = 0) -> Dataset:
    """EMPIAR-10146 apoferritin: 19 micrographs 1240 x 1200, radius ~30 px, binned by 4.

    Train = the first 5 micrographs in sorted order, held-out = the other 14.
    """
    folder = Path(root or data_root()) / "empiar10146_apoferritin"
    names = sorted(p.stem for p in (folder / "micrographs").glob("*.mrc"))
    if not names:
        raise FileNotFoundError(f"{folder / 'micrographs'}: no .mrc micrographs")
    return Dataset("apoferritin", folder / "micrographs", folder / "particles.txt", radius=30.0, downsample=4,
                   train=tuple(names[:5]), heldout=tuple(names[5:]), n_labels=n_labels, label_seed=label_seed,
                   notes="easy set; dark ice contamination that is not a particle")


def ribosome(root=None, n_labels: int = 100, label_seed: int = 0) -> Dataset:
    """EMPIAR-10028 80S ribosome: 10 micrographs 1024 x 1024, radius ~28 px, binned by 4.

    The split is the dataset's ``split.txt``: train = train, valid = valid, held-out = test. The ground truth is
    incomplete (no particle within ~33 px of the border, some particles unmarked): precision is a lower bound.
    """
    folder = Path(root or data_root()) / "empiar10028_ribosome"
    split = pd.read_csv(folder / "split.txt", sep=r"\s+", header=None, names=["micrograph", "split"], dtype=str)
    part = {s: tuple(sorted(split.loc[split["split"] == s, "micrograph"])) for s in ("train", "valid", "test")}
    return Dataset("ribosome", folder / "micrographs", folder / "particles.txt", radius=28.0, downsample=4,
                   train=part["train"], valid=part["valid"], heldout=part["test"], n_labels=n_labels,
                   label_seed=label_seed, notes="ground truth incomplete: precision and AP are lower bounds")


def cryoppp(root=None, n_labels: int = 100, label_seed: int = 0) -> Dataset:
    """EMPIAR-10947 (CryoPPP subset), the hard set: 10 micrographs 1024 x 1024, ~200 small crowded low-contrast
    particles each, radius ~29 px, pixel values from 8-bit images (about 20 grey levels), a carbon edge on some.

    The split is the dataset's ``split.txt``: train = train + valid (the labels come from these 5), held-out =
    test. The ground truth was recovered from 256 x 256 masks: positions are approximate and crowded particles may
    be merged.
    """
    folder = Path(root or data_root()) / "empiar10947_cryoppp"
    split = pd.read_csv(folder / "split.txt", sep=r"\s+", header=None, names=["micrograph", "split"], dtype=str)
    part = {s: tuple(sorted(split.loc[split["split"] == s, "micrograph"])) for s in ("train", "valid", "test")}
    return Dataset("cryoppp", folder / "micrographs", folder / "particles.txt", radius=29.0, downsample=2,
                   train=part["train"] + part["valid"], heldout=part["test"], n_labels=n_labels,
                   label_seed=label_seed, notes="hard set: small, crowded, low-contrast particles; approximate truth")


def synthetic(folder, n_micrographs: int = 8, shape=(1024, 1024), radius: float = 12.0, snr: float = 0.1,
              n_train: int = 4, downsample: int = 2, n_labels: int = 100, label_seed: int = 0, seed: int = 0,
              overwrite: bool = False) -> Dataset:
    """A synthetic set from ``napari_pupick.synthetic.make_synthetic``, written to ``folder`` (once).

    Writes ``folder/micrographs/<name>.mrc`` (float32) and ``folder/particles.txt`` (Topaz-style, all particles).
    Train = the first ``n_train`` micrographs, held-out = the rest. Rewritten only when missing or ``overwrite``.
    """
    folder = Path(folder)
    params = dict(n_micrographs=n_micrographs, shape=tuple(shape), radius=float(radius), snr=float(snr), seed=seed)
    stamp = folder / "params.txt"
    particles_path = folder / "particles.txt"
    if overwrite or not stamp.is_file() or stamp.read_text() != repr(params):
        from napari_pupick.io import write_micrograph
        from napari_pupick.synthetic import make_synthetic

        synth = make_synthetic(n_micrographs=n_micrographs, shape=tuple(shape), radius=radius, snr=snr, seed=seed)
        (folder / "micrographs").mkdir(parents=True, exist_ok=True)
        for name, image in zip(synth.names, synth.micrographs):
            write_micrograph(folder / "micrographs" / f"{name}.mrc", image)
        table = synth.particles.rename(columns={"micrograph": "image_name", "x": "x_coord", "y": "y_coord"})
        table[["image_name", "x_coord", "y_coord"]].to_csv(particles_path, sep="\t", index=False)
        stamp.write_text(repr(params))
    names = sorted(p.stem for p in (folder / "micrographs").glob("*.mrc"))
    return Dataset("synthetic", folder / "micrographs", particles_path, radius=float(radius), downsample=downsample,
                   train=tuple(names[:n_train]), heldout=tuple(names[n_train:]), n_labels=n_labels,
                   label_seed=label_seed, notes=f"make_synthetic({params})", extra=params)


DATASETS = ("synthetic", "apoferritin", "ribosome", "cryoppp")
REAL_DATASETS = ("apoferritin", "ribosome", "cryoppp")


def get_dataset(name: str, workdir=None, **kwargs) -> Dataset:
    """A dataset by name; ``synthetic`` is written under ``workdir/synthetic`` (required for it)."""
    if name == "apoferritin":
        return apoferritin(**kwargs)
    if name == "ribosome":
        return ribosome(**kwargs)
    if name == "cryoppp":
        return cryoppp(**kwargs)
    if name == "synthetic":
        if workdir is None:
            raise ValueError("the synthetic dataset needs a workdir to be written to")
        return synthetic(Path(workdir) / "synthetic", **kwargs)
    raise ValueError(f"unknown dataset {name!r} (use one of {', '.join(DATASETS)})")


def _call(fn_and_args):
    fn, args = fn_and_args
    return fn(*args)


def parallel(fn, jobs, workers: int = 2) -> list:
    """``fn(*job)`` for every job in ``workers`` processes (in order), printing each result as a JSON line."""
    import json
    from concurrent.futures import ProcessPoolExecutor

    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for res in pool.map(_call, [(fn, tuple(job)) for job in jobs]):
            print(json.dumps(res, default=str), flush=True)
            results.append(res)
    return results


def markdown(df) -> str:
    """A pandas table as a markdown table (floats to 3 decimals)."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [" | ".join(map(str, df.columns))] + [" | ".join("---" for _ in df.columns)]
    rows += [" | ".join(fmt(v) for v in rec) for rec in df.itertuples(index=False)]
    return "\n".join(f"| {r} |" for r in rows)
