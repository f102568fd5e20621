"""Training: label maps, prior, tiles, reproducibility, stop/error handling, checkpoints, end to end."""

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from napari_pupick import training
from napari_pupick.errors import CoordinateError, ModelError, TrainingError
from napari_pupick.extract import nms
from napari_pupick.metrics import average_precision
from napari_pupick.predict import score_micrograph
from napari_pupick.preprocess import downsample
from napari_pupick.synthetic import make_synthetic
from napari_pupick.training import Checkpoint, TrainConfig, Trainer, label_map, train

torch.set_num_threads(1)

TINY = dict(model_params={"width": 0.25}, tile=49, batch_size=4, epochs=1, steps_per_epoch=3, threads=1,
            device="cpu", expected_particles=10)


def _normalize(im):
    return ((im - im.mean()) / im.std()).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_set():
    syn = make_synthetic(n_micrographs=3, shape=(96, 112), n_particles=10, radius=5.0, snr=1.0, n_labels=8,
                         label_micrographs=2, seed=3)
    return [_normalize(m) for m in syn.micrographs], syn.names, syn.labels, syn


def _weights(ckpt):
    return {k: v.clone() for k, v in ckpt.state_dict.items()}


# -- label maps and prior -----------------------------------------------------------------------------------------


def test_label_map_by_hand():
    # 20 x 17 pixels, stride 4: cells at rows 0, 4, ..., 16 (5) and columns 0, 4, ..., 16 (5).
    # Particle at (x=8, y=9), r = 3: cell centres within 3 px: (row 8, col 8) at distance 1 and (row 12, col 8) at
    # distance 3 (inclusive) -> cells (2, 2) and (3, 2).
    labels = label_map((20, 17), 4, np.array([[8.0, 9.0]]), 3.0)
    assert labels.shape == (5, 5) and labels.dtype == np.int8
    assert sorted(map(tuple, np.argwhere(labels == 1))) == [(2, 2), (3, 2)]
    # r = 1: only the nearest cell (2, 2) (distance 1); r = 0: still the nearest cell.
    assert np.argwhere(label_map((20, 17), 4, np.array([[8.0, 9.0]]), 1.0) == 1).tolist() == [[2, 2]]
    assert np.argwhere(label_map((20, 17), 4, np.array([[8.0, 9.0]]), 0.0) == 1).tolist() == [[2, 2]]
    # A negative at (x=12, y=10): cells (row 8, col 12) and (row 12, col 12) at distance 2 -> (2, 3), (3, 3).
    both = label_map((20, 17), 4, np.array([[8.0, 9.0]]), 3.0, negatives=np.array([[12.0, 10.0]]))
    assert sorted(map(tuple, np.argwhere(both == 2))) == [(2, 3), (3, 3)]
    assert sorted(map(tuple, np.argwhere(both == 1))) == [(2, 2), (3, 2)]
    # Where a negative and a positive disc overlap, the cell stays positive.
    overlap = label_map((20, 17), 4, np.array([[8.0, 9.0]]), 3.0, negatives=np.array([[8.0, 11.0]]))
    assert overlap[2, 2] == 1 and overlap[3, 2] == 1


def test_prior_formula(tiny_set):
    images, names, labels, _ = tiny_set
    cfg = TrainConfig(**{**TINY, "expected_particles": 20, "label_radius": 3.0})
    tr = Trainer(images, names, labels, cfg)
    tr.model = training.build_model("conv3", width=0.25)
    tr._prepare(tr.model)
    a = tr.cells_per_particle
    # A = mean positive cells per label: at least the nearest cell, at most the disc area pi r^2 / stride^2 (+ edge)
    assert a >= 1.0
    assert a <= math.pi * 9 / 16 + 2
    cells = 24 * 28  # ceil(96 / 4) x ceil(112 / 4)
    for name in names:
        n = int((labels.micrograph == name).sum())
        expected = (20 - n) * a / (cells - n * a)
        assert tr.pi_by_micrograph[name] == pytest.approx(expected)
    cfg.pi = 0.03
    tr2 = Trainer(images, names, labels, cfg)
    tr2._prepare(tr.model)
    assert set(tr2.pi_by_micrograph.values()) == {0.03}


def test_tiles_are_aligned_and_augmented_consistently(tiny_set):
    """Every tile's positive cells sit on labelled particles, whatever the rotation or flip."""
    images, names, labels, _ = tiny_set
    # Mark labelled particles in an otherwise zero image with a bright pixel, and check tiles carry it over.
    marked = [np.zeros_like(im) for im in images]
    for i, name in enumerate(names):
        for x, y in labels[labels.micrograph == name][["x", "y"]].to_numpy():
            marked[i][int(round(y / 4)) * 4, int(round(x / 4)) * 4] = 1.0
    cfg = TrainConfig(**{**TINY, "label_radius": 0.0})
    tr = Trainer(marked, names, labels, cfg)
    tr.model = training.build_model("conv3", width=0.25)
    tr._prepare(tr.model)
    rng = np.random.default_rng(0)
    n_checked = 0
    for _ in range(40):
        image, lab, pi = tr._tile(rng, anchored=True)
        assert image.shape == (tr.tile, tr.tile) and lab.shape == ((tr.tile - 1) // 4 + 1,) * 2
        for i, j in np.argwhere(lab == training.POSITIVE):
            assert image[4 * i, 4 * j] == 1.0
            n_checked += 1
        assert pi == pytest.approx(tr.pi_by_micrograph[names[0]]) or pi in tr.pi_by_micrograph.values()
    assert n_checked >= 40


def test_tile_margin_excludes_cells_along_inner_sides(tiny_set):
    images, names, labels, _ = tiny_set
    cfg = TrainConfig(**{**TINY, "tile_margin": 1.0, "augment": False})
    tr = Trainer(images, names, labels, cfg)
    tr.model = training.build_model("conv3", width=0.25)
    tr._prepare(tr.model)
    k = tr.margin_cells
    assert k == math.ceil((tr.model.receptive_field // 2) / 4)
    rng = np.random.default_rng(1)
    seen = 0
    for _ in range(30):
        _, lab, _ = tr._tile(rng, anchored=False)
        ex = lab == training.EXCLUDED
        # Each side is either inner (all its cells excluded) or on the micrograph border (none excluded) ...
        top, bottom, left, right = ex[:k, k:-k], ex[-k:, k:-k], ex[k:-k, :k], ex[k:-k, -k:]
        for side in (top, bottom, left, right):
            assert side.all() or not side.any()
        t, b, l_, r = top.all(), bottom.all(), left.all(), right.all()
        assert ex[:k, :k].all() == (t or l_) and ex[-k:, -k:].all() == (b or r)
        assert not ex[k:-k, k:-k].any()  # ... and the interior is never excluded
        seen += int(ex.any())
    assert seen > 0
    tr0 = Trainer(images, names, labels, TrainConfig(**{**TINY, "tile_margin": 0.0}))
    tr0.model = tr.model
    tr0._prepare(tr.model)
    assert tr0.margin_cells == 0
    assert not any((tr0._tile(rng, anchored=False)[1] == training.EXCLUDED).any() for _ in range(10))


# -- input checks --------------------------------------------------------------------------------------------------


def test_input_errors(tiny_set):
    images, names, labels, _ = tiny_set
    cfg = TrainConfig(**TINY)
    with pytest.raises(TrainingError, match="no positive labels"):
        Trainer(images, names, labels.iloc[:0], cfg)
    with pytest.raises(TrainingError, match="no positive labels"):
        Trainer(images, names, None, cfg)
    with pytest.raises(TrainingError, match="expected_particles"):
        Trainer(images, names, labels, TrainConfig(**{**TINY, "expected_particles": None}))
    bad = labels.copy()
    bad.loc[0, "x"] = 5000.0
    with pytest.raises(CoordinateError, match="outside"):
        Trainer(images, names, bad, cfg)
    with pytest.raises(CoordinateError, match="not among the images"):
        Trainer(images, names, labels.assign(micrograph="nope"), cfg)
    with pytest.raises(TrainingError, match="held out"):
        Trainer(images, names, labels, cfg, holdout=sorted(set(labels.micrograph)))
    unlabeled = [n for n in names if n not in set(labels.micrograph)]
    with pytest.raises(TrainingError, match="without labels"):
        Trainer(images, names, labels, cfg, holdout=unlabeled)
    with pytest.raises(TrainingError, match="too small"):
        Trainer([im[:5, :40] for im in images], names, labels[labels.x < 40].assign(y=1.0), cfg).run().__next__()
    with pytest.raises(TrainingError, match="unknown objective"):
        Trainer(images, names, labels, TrainConfig(**{**TINY, "objective": "magic"}))


# -- runs ----------------------------------------------------------------------------------------------------------


def test_events_and_reproducibility(tiny_set):
    images, names, labels, _ = tiny_set
    cfg = TrainConfig(**{**TINY, "epochs": 2, "steps_per_epoch": 2})
    tr = Trainer(images, names, labels, cfg)
    events = list(tr.run())
    kinds = [e.kind for e in events]
    assert kinds == ["start", "step", "step", "epoch", "step", "step", "epoch", "done"]
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3, 4]
    assert all(e.total_steps == 4 for e in events)
    assert all(e.examples_per_s > 0 and math.isfinite(e.losses["loss"]) for e in events if e.kind == "step")
    assert tr.best is not None and len(tr.best.history) == 2
    again = train(images, names, labels, cfg)
    for k, v in tr.best.state_dict.items():
        assert torch.equal(v, again.state_dict[k]), k
    other = train(images, names, labels, TrainConfig(**{**TINY, "epochs": 2, "steps_per_epoch": 2, "seed": 1}))
    assert any(not torch.equal(v, other.state_dict[k]) for k, v in tr.best.state_dict.items())


@pytest.mark.parametrize("objective", ["pn", "nnpu", "ge-kl", "ge-binomial"])
def test_every_objective_and_negatives_train(tiny_set, objective):
    images, names, labels, syn = tiny_set
    negatives = syn.junk[["micrograph", "x", "y"]]
    negatives = negatives[negatives.micrograph.isin(names[:2])]
    cfg = TrainConfig(**{**TINY, "objective": objective, "autoencoder": 0.1 if objective == "pn" else 0.0})
    tr = Trainer(images, names, labels, cfg, negatives=negatives)
    steps = [e for e in tr.run() if e.kind == "step"]
    assert len(steps) == 3 and all(math.isfinite(e.losses["loss"]) for e in steps)
    assert len(negatives) and any("negative" in e.losses for e in steps)
    if objective == "pn":
        assert "reconstruction" in steps[0].losses


def test_stop_midway_keeps_a_model(tiny_set):
    images, names, labels, _ = tiny_set
    tr = Trainer(images, names, labels, TrainConfig(**{**TINY, "steps_per_epoch": 50}))
    assert tr.best is None and tr.latest is None
    events = []
    for e in tr.run():
        events.append(e)
        if e.kind == "step" and e.step == 2:
            tr.stop()
    assert events[-1].kind == "stopped" and events[-1].step == 2
    best = tr.best
    assert best is not None
    net = best.build()
    assert not net.training
    out = score_micrograph(net, images[0])
    assert out.shape == images[0].shape and np.isfinite(out).all()


def test_closing_the_generator_restores_threads(tiny_set):
    images, names, labels, _ = tiny_set
    torch.set_num_threads(2)
    try:
        gen = Trainer(images, names, labels, TrainConfig(**{**TINY, "threads": 1})).run()
        next(gen)
        next(gen)
        assert torch.get_num_threads() == 1
        gen.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_nan_loss_stops_with_message_and_last_good_weights(tiny_set, monkeypatch):
    images, names, labels, _ = tiny_set
    real = training.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(training, "compute_loss", poisoned)
    tr = Trainer(images, names, labels, TrainConfig(**{**TINY, "steps_per_epoch": 10}))
    events = []
    gen = tr.run()
    snapshots = {}
    with pytest.raises(TrainingError, match="step 3.*loss is nan.*step 2"):
        for e in gen:
            events.append(e)
            if e.kind == "step":
                snapshots[e.step] = _weights(tr.latest)
    assert events[-1].kind == "error" and "loss is nan" in events[-1].message
    for k, v in tr.best.state_dict.items():
        assert torch.equal(v, snapshots[2][k])
        assert torch.isfinite(v.float()).all()


@pytest.mark.parametrize("lr", [1e12, 10.0])
def test_absurd_learning_rate_keeps_no_diverged_weights(tiny_set, lr):
    # 1e12: NaN scores after one step; 10: used to end "done" with every logit above 6e4
    images, names, labels, _ = tiny_set
    cfg = TrainConfig(**{**TINY, "lr": lr, "warmup": 0, "steps_per_epoch": 30})
    tr = Trainer(images, names, labels, cfg)
    events = []
    with pytest.raises(TrainingError, match="step 1 .*logits.*no model to keep.*lower learning rate"):
        for e in tr.run():
            events.append(e)
    assert events[-1].kind == "error"
    assert tr.latest is None and tr.best is None
    assert all(torch.isfinite(v.float()).all() for v in tr.model.state_dict().values())  # restored to the start


def test_divergence_midway_keeps_the_last_good_weights(tiny_set):
    images, names, labels, _ = tiny_set
    tr = Trainer(images, names, labels, TrainConfig(**{**TINY, "steps_per_epoch": 30, "warmup": 0}))
    snapshots = {}
    with pytest.raises(TrainingError, match=r"keeping the weights of step (\d)") as info:
        for e in tr.run():
            if e.kind == "step":
                snapshots[e.step] = _weights(tr.latest)
                if e.step == 3:  # the learning rate jumps from step 5 on (step 4's rate is already set)
                    tr.scheduler.base_lrs = [1e4 for _ in tr.scheduler.base_lrs]
    kept = int(re.search(r"weights of step (\d+)", str(info.value)).group(1))
    assert kept == 4
    for k, v in tr.best.state_dict.items():
        assert torch.equal(v, snapshots[kept][k])
    scores = score_micrograph(tr.best.build(), images[0])
    assert np.isfinite(scores).all() and np.abs(scores).max() < 1e3


def test_loss_far_above_its_start_stops(tiny_set, monkeypatch):
    images, names, labels, _ = tiny_set
    real = training.compute_loss
    calls = {"n": 0}

    def inflated(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * 1e3 if calls["n"] == 4 else loss), terms

    monkeypatch.setattr(training, "compute_loss", inflated)
    tr = Trainer(images, names, labels, TrainConfig(**{**TINY, "steps_per_epoch": 10}))
    # step 4's loss judges step 3's weights: they are dropped, step 2's are kept
    with pytest.raises(TrainingError, match="step 4.*100 x its start.*weights of step 2"):
        for _ in tr.run():
            pass
    assert tr.best is not None


def test_latest_is_none_before_the_first_step_and_a_cancelled_retrain_keeps_nothing_new(tiny_set):
    images, names, labels, _ = tiny_set
    first = train(images, names, labels, TrainConfig(**TINY))
    tr = Trainer(images, names, labels, TrainConfig(**TINY), init=first)
    events = []
    for e in tr.run():
        events.append(e)
        if e.kind == "start":
            assert tr.latest is None
            tr.stop()
    assert events[-1].kind == "stopped" and events[-1].step == 0
    assert tr.latest is None and tr.best is None


def test_nan_labels_are_refused_before_training(tiny_set):
    images, names, labels, _ = tiny_set
    bad = labels.copy()
    bad.loc[bad.index[2], "x"] = float("nan")
    with pytest.raises(CoordinateError, match=r"positive labels: 1 row\(s\) without finite coordinates, e.g. row 3"):
        Trainer(images, names, bad, TrainConfig(**TINY))


# -- checkpoints ---------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tiny_set, tmp_path):
    images, names, labels, _ = tiny_set
    cfg = TrainConfig(**{**TINY, "model": "resnet8"})
    ckpt = train(images, names, labels, cfg, preprocess={"downsample": 2, "method": "affine", "gmm": None})
    path = ckpt.save(tmp_path / "sub" / "model.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    raw = torch.load(path, weights_only=True, map_location="cpu")  # plain types and tensors only
    assert raw["format"] == "napari-pupick-checkpoint" and raw["model"] == "resnet8"
    back = Checkpoint.load(path)
    assert back.model == "resnet8" and back.model_params == ckpt.model_params
    assert back.preprocess == {"downsample": 2, "method": "affine", "gmm": None}
    assert back.config["tile"] == cfg.tile and TrainConfig.from_dict(back.config).model == "resnet8"
    assert back.history == ckpt.history
    a = score_micrograph(ckpt.build(), images[2])
    b = score_micrograph(back.build("cpu"), images[2])
    np.testing.assert_array_equal(a, b)


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(ModelError, match="no such checkpoint"):
        Checkpoint.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ModelError, match="junk.pt"):
        Checkpoint.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelError, match="not a napari-pupick checkpoint"):
        Checkpoint.load(other)
    bad = Checkpoint("conv3", {"width": 0.25}, {"head.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="do not fit"):
        bad.build()


def test_retraining_starts_from_init(tiny_set):
    images, names, labels, _ = tiny_set
    first = train(images, names, labels, TrainConfig(**TINY))
    tr = Trainer(images, names, labels, TrainConfig(**{**TINY, "model": "resnet8", "lr": 1e-9}), init=first)
    gen = tr.run()
    next(gen)  # start
    next(gen)  # one step at a negligible learning rate
    assert tr.config.model == "conv3"  # the checkpoint's architecture wins
    # Weights (batch-norm running statistics aside) are still those of the checkpoint.
    for k, v in tr.latest.state_dict.items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(v, first.state_dict[k], atol=1e-6, rtol=0)
    gen.close()


# -- end to end ----------------------------------------------------------------------------------------------------


def test_end_to_end_learns_to_pick():
    """Train from scratch on sparse labels, then score, pick and measure AP on an unseen micrograph."""
    syn = make_synthetic(n_micrographs=4, shape=(320, 320), n_particles=35, radius=12.0, snr=0.3, n_labels=30,
                         label_micrographs=3, seed=11)
    images = [_normalize(downsample(m, 2)) for m in syn.micrographs]  # 160 x 160, particle radius 6
    hold = syn.names[3]
    truth = syn.particles[syn.particles.micrograph == hold][["micrograph", "x", "y"]]
    positives = pd.concat([syn.labels, truth], ignore_index=True)
    positives = positives.assign(x=positives.x / 2, y=positives.y / 2)
    truth = positives[positives.micrograph == hold]
    cfg = TrainConfig(model_params={"width": 0.5}, particle_radius=6.0, expected_particles=35, epochs=4,
                      steps_per_epoch=15, batch_size=4, tile=97, threads=1, device="cpu")
    tr = Trainer(images, syn.names, positives, cfg, holdout=[hold])
    events = list(tr.run())
    aps = [e.heldout_ap for e in events if e.kind == "epoch"]
    best = tr.best
    assert best.metrics["heldout_ap"] == pytest.approx(max(aps))
    assert "threshold_f2" in best.metrics
    # Independent check with the public pieces, matching within half the particle radius.
    scores = score_micrograph(best.build(), images[3])
    picks = nms(scores, 6.0, threshold=-8.0).assign(micrograph=hold)
    ap = average_precision(picks, truth, 3.0)
    assert ap == pytest.approx(max(aps), abs=1e-6)
    # Chance level: a pick at a random position lies within 3 px of one of the 35 particles with probability
    # about 35 * pi * 3^2 / 160^2 ~ 0.04.
    assert ap > 0.5, (ap, aps)
