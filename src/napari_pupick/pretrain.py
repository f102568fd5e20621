"""A general starting model: supervised pretraining on varied synthetic micrographs.

Topaz ships weights pretrained on real micrographs; napari-pupick makes its own from the synthetic generator
alone (the shared real sets are benchmarks and never train it). Every group of synthetic micrographs draws its own
conditions, covering what makes picking hard: particle shape (dumbbell, rod, ring, globule, lobes), radius (the 8-18
binned pixels the automatic binning produces), radius spread, crowding (particles touching), SNR from 0.01 to 0.3,
quantized 8-bit sources, carbon films with an edge, ice thickness gradients, ice blobs and small fragments. Each
group is binned and normalized exactly as training does (:class:`~napari_pupick.preprocess.Preprocessor`, GMM),
and every particle is labelled, so the loss is plain binary cross-entropy: cells within the label radius of a
particle are positive, all others negative (fragments, ice and carbon edges included).

The result is a checkpoint like any other (``metrics["general"] = True``); :class:`~napari_pupick.training.
Trainer` resets its head's bias to the new data's prior when it starts from it.

>>> for event in pretrain_run(steps=3000, seed=0, output="general.pt"):   # doctest: +SKIP
...     print(event.step, event.losses)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["GENERAL_MODEL", "general_model_path", "load_general", "pretrain_run", "random_conditions",
           "synthetic_group"]

#: File name of the general starting model shipped inside the package.
GENERAL_MODEL = "general_conv3.pt"


def general_model_path() -> Path:
    """Where the shipped general starting model lies (inside the installed package)."""
    from importlib.resources import files

    return Path(str(files("napari_pupick") / "weights" / GENERAL_MODEL))


def load_general():
    """The shipped general starting model as a Checkpoint (``torch.load(weights_only=True)``), or None if absent."""
    from napari_pupick.training import Checkpoint

    path = general_model_path()
    return Checkpoint.load(path) if path.is_file() else None


def random_conditions(rng: np.random.Generator, binned: int = 320) -> dict:
    """Draw the conditions of one synthetic group (arguments of ``make_synthetic`` plus ``downsample``)."""
    from napari_pupick.synthetic import SHAPES

    factor = int(rng.choice([1, 2]))
    radius_binned = float(rng.uniform(8.0, 18.0))
    radius = radius_binned * factor
    coverage = float(rng.uniform(0.05, 0.5))
    side = binned * factor
    n = int(coverage * side * side / (math.pi * radius * radius))
    spacing = float(rng.uniform(1.85, 3.0)) if coverage > 0.25 else float(rng.uniform(2.1, 4.0))
    return dict(shape=(side, side), n_particles=max(n, 3), radius=radius, downsample=factor,
                particle_shape=str(rng.choice(SHAPES)), snr=float(math.exp(rng.uniform(math.log(0.01), math.log(0.3)))),
                spacing=spacing, radius_jitter=float(rng.uniform(0.0, 0.2)), carbon=bool(rng.random() < 0.3),
                quantize=int(rng.integers(12, 49)) if rng.random() < 0.3 else None, junk=bool(rng.random() < 0.8))


def synthetic_group(conditions: dict, n_micrographs: int, seed: int):
    """One group of synthetic micrographs, binned and normalized as training does.

    Returns ``(images, centres, binned_radius)``: a list of (h, w) float32 images, a list of (n, 2) arrays of
    particle (x, y) in binned pixels, and the particle radius in binned pixels.
    """
    from napari_pupick.preprocess import Preprocessor
    from napari_pupick.synthetic import make_synthetic

    kw = dict(conditions)
    factor = int(kw.pop("downsample"))
    synth = make_synthetic(n_micrographs=n_micrographs, seed=seed, **kw)
    images = Preprocessor(downsample=factor, method="gmm").fit_transform(synth.micrographs)
    centres = [synth.particles.loc[synth.particles["micrograph"] == n, ["x", "y"]].to_numpy(float) / factor
               for n in synth.names]
    return images, centres, float(kw["radius"]) / factor


class _Pool:
    """Labelled tiles from a pool of synthetic groups, a few replaced as training goes on."""

    def __init__(self, rng, groups: int, per_group: int, stride: int, label_radius: float, seed: int):
        self.rng, self.per_group, self.stride, self.label_radius = rng, per_group, stride, label_radius
        self.seed = seed
        self.made = 0
        self.items: list = []
        for _ in range(groups):
            self.items.append(self._group())

    def _group(self):
        from napari_pupick.training import label_map

        self.made += 1
        cond = random_conditions(self.rng)
        images, centres, _ = synthetic_group(cond, self.per_group, seed=self.seed * 100003 + self.made)
        return [(im, label_map(im.shape, self.stride, c, self.label_radius), c) for im, c in zip(images, centres)]

    def refresh(self) -> None:
        self.items[int(self.rng.integers(len(self.items)))] = self._group()

    def tile(self, side: int, anchored: bool):
        group = self.items[int(self.rng.integers(len(self.items)))]
        image, labels, centres = group[int(self.rng.integers(len(group)))]
        s = self.stride
        h, w = image.shape
        max_oy, max_ox = (h - side) // s, (w - side) // s
        n = (side - 1) // s
        if anchored and len(centres):
            x, y = centres[int(self.rng.integers(len(centres)))]
            oy = int(np.clip(round(y / s) - int(self.rng.integers(n + 1)), 0, max_oy))
            ox = int(np.clip(round(x / s) - int(self.rng.integers(n + 1)), 0, max_ox))
        else:
            oy, ox = int(self.rng.integers(max_oy + 1)), int(self.rng.integers(max_ox + 1))
        img = image[oy * s : oy * s + side, ox * s : ox * s + side]
        lab = labels[oy : oy + n + 1, ox : ox + n + 1]
        k = int(self.rng.integers(4))
        img, lab = np.rot90(img, k), np.rot90(lab, k)
        if self.rng.integers(2):
            img, lab = img[:, ::-1], lab[:, ::-1]
        return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def pretrain_run(steps: int = 3000, *, seed: int = 0, model: str = "conv3", model_params: dict | None = None,
                 batch_size: int = 16, tile: int = 129, lr: float = 2e-3, groups: int = 12, per_group: int = 3,
                 refresh_every: int = 10, label_radius: float = 3.0, threads: int | None = None, device="auto",
                 output=None) -> Iterator:
    """Pretrain a general model, yielding a :class:`~napari_pupick.training.TrainEvent` after every step.

    Parameters
    ----------
    steps : optimisation steps (Adam, linear warm-up then cosine decay from ``lr``).
    seed : seeds the conditions, the micrographs and the network.
    model, model_params : the architecture (``build_model``).
    batch_size, tile : tiles of ``tile`` binned pixels per step (half of them over a particle).
    groups, per_group : synthetic groups in the pool, micrographs per group (each group has its own conditions).
    refresh_every : replace one group of the pool every this many steps.
    label_radius : cells within this many binned pixels of a particle are positive.
    output : when given, the checkpoint is saved there at the end (atomically).

    The kept checkpoint is the generator's return value (``StopIteration.value``) and ``event.message`` of the
    last event names where it was saved.
    """
    import torch

    from napari_pupick.models import build_model
    from napari_pupick.predict import select_device, set_threads
    from napari_pupick.training import Checkpoint, TrainEvent

    rng = np.random.default_rng(seed)
    previous = set_threads(threads or 1)
    try:
        dev = select_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_model(model, **dict(model_params or {}))
        with torch.no_grad():
            net.head.bias.fill_(math.log(0.1 / 0.9))
        net = net.to(dev).train()
        side = net.stride * ((tile - 1) // net.stride) + 1
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        warm = max(steps // 50, 1)

        def factor(i):
            return (i + 1) / warm if i < warm else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (i - warm) /
                                                                                      max(steps - warm, 1)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        yield TrainEvent("start", 0, 0, steps, message=f"pretraining {net.name} on synthetic micrographs: "
                                                       f"{groups} groups of {per_group}, {steps} steps, {dev}")
        pool = _Pool(rng, groups, per_group, net.stride, label_radius, seed)
        t_start = time.perf_counter()
        examples = 0
        for step in range(1, steps + 1):
            tiles = [pool.tile(side, i < batch_size // 2) for i in range(batch_size)]
            x = torch.from_numpy(np.stack([t[0] for t in tiles]))[:, None].to(dev)
            y = torch.from_numpy(np.stack([t[1] for t in tiles])).to(dev)
            z = net(x)[:, 0]
            pos = (y == 1).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, pos)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            examples += int(y.numel())
            if step % refresh_every == 0:
                pool.refresh()
            rate = examples / max(time.perf_counter() - t_start, 1e-9)
            yield TrainEvent("step", step, 0, steps, {"loss": float(loss.detach())}, None, rate)
        state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        ckpt = Checkpoint(model=net.name, model_params=dict(net.hparams), state_dict=state,
                          preprocess={"downsample": 1, "method": "gmm", "gmm": None},
                          config={"label_radius": label_radius, "particle_radius": 12.0},
                          metrics={"general": True, "pretrain_steps": steps, "pretrain_seed": seed,
                                   "synthetic_groups": pool.made, "wall_s": time.perf_counter() - t_start},
                          created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        where = ""
        if output is not None:
            ckpt.save(output)
            where = f"; saved {output}"
        yield TrainEvent("done", steps, 0, steps, message=f"pretrained {steps} steps on {pool.made} synthetic groups "
                                                          f"in {time.perf_counter() - t_start:.0f} s{where}")
        return ckpt
    finally:
        set_threads(previous)
