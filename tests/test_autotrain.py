"""Two-round training: the survey's count estimate and threshold, the kept model, stopping, retraining, seeds."""

import numpy as np
import pytest
import torch

from napari_pupick.autotrain import AutoTrainer
from napari_pupick.pipeline import training_run
from napari_pupick.synthetic import make_synthetic

TINY = dict(epochs=2, steps_per_epoch=6, model_params={"width": 0.25}, threads=1, device="cpu", init="none")


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(n_micrographs=3, shape=(256, 256), n_particles=30, radius=10, snr=0.5, n_labels=24,
                          seed=5)


def _run(trainer, stop_after=None):
    events = []
    for ev in trainer.run():
        events.append(ev)
        if stop_after is not None and ev.kind == "step" and ev.step >= stop_after:
            trainer.stop()
    return events


def test_two_rounds_estimate_the_count_and_calibrate_the_threshold(synth):
    tr = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=0, **TINY)
    assert isinstance(tr, AutoTrainer) and tr.surveying
    assert len(tr.heldout) == 8 and len(tr.trained) == 16  # a third of 24 labels held out
    events = _run(tr)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("calibrated") == 1
    assert kinds.count("round") == 2
    steps = [e.step for e in events if e.kind == "step"]
    assert steps == list(range(1, 2 * 12 + 1))  # counted over both rounds
    assert all(e.total_steps == 24 for e in events)
    # the survey monitors every epoch: recall of the held-out labels and the estimated precision
    survey_epochs = [e for e in events[: kinds.index("calibrated")] if e.kind == "epoch"]
    assert len(survey_epochs) == 2 and all(0 <= e.monitor["label_recall"] <= 1 for e in survey_epochs)
    m = tr.best.metrics
    assert m["expected_source"] == "estimated" and m["expected_particles"] > 0
    assert np.isfinite(m["threshold"]) and 0 <= m["precision"] <= 1
    assert "round 2" in m["kept"] and m["calibration"]["n_heldout"] == 8
    # the final threshold keeps as many picks on the training micrographs as the survey's did
    cands = tr.candidates(tr.best)
    kept = (cands["score"] >= m["threshold"]).sum() / len(synth.names)
    assert kept == pytest.approx(m["picks_per_micrograph"], abs=1.0)


def test_a_given_count_is_used_and_a_strong_disagreement_is_warned(synth):
    tr = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=0, expected_particles=900,
                      **TINY)
    events = _run(tr)
    cal = next(e for e in events if e.kind == "calibrated")
    assert "Warning" in cal.message and "900" in cal.message
    assert tr.best.metrics["expected_source"] == "given" and tr.best.metrics["expected_particles"] == 900


def test_stop_during_the_survey_keeps_a_calibrated_survey_model(synth):
    tr = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=0, **TINY)
    events = _run(tr, stop_after=3)
    assert events[-1].kind == "stopped"
    best = tr.best
    assert best is not None and best.metrics["round"] == "survey" and "threshold" in best.metrics
    assert "stopped before round 2" in best.metrics["kept"]


def test_stop_before_the_first_step_keeps_nothing(synth):
    tr = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=0, **TINY)
    tr.stop()
    events = _run(tr)
    assert events[-1].kind == "stopped" and tr.best is None


def test_retraining_with_a_calibration_is_one_round(synth):
    first = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=0, **TINY)
    _run(first)
    ckpt = first.best
    again = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=1,
                         calibration=ckpt.metrics["calibration"], **{**TINY, "init": ckpt})
    assert not again.surveying
    events = _run(again)
    assert [e.kind for e in events].count("calibrated") == 0 and events[-1].total_steps == 12
    m = again.best.metrics
    assert m["expected_particles"] == pytest.approx(ckpt.metrics["expected_particles"])
    assert "previous model" in m["kept"] and np.isfinite(m["threshold"])


def test_same_seed_same_model(synth):
    a = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=3, **TINY)
    b = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=3, **TINY)
    _run(a), _run(b)
    assert a.best.metrics["threshold"] == b.best.metrics["threshold"]
    for k, v in a.best.state_dict.items():
        assert torch.equal(v, b.best.state_dict[k]), k


def _inflate_loss_at(monkeypatch, call):
    """Make the ``call``-th loss 1e3 times its value: the trainer sees a diverging loss there."""
    from napari_pupick import training

    real = training.compute_loss
    calls = {"n": 0}

    def inflated(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * 1e3 if calls["n"] == call else loss), terms

    monkeypatch.setattr(training, "compute_loss", inflated)


@pytest.mark.parametrize("call, round_", [(16, "final"), (4, "survey")])
def test_divergence_keeps_the_last_good_weights_calibrated_and_raises(synth, monkeypatch, call, round_):
    from napari_pupick.errors import TrainingError

    _inflate_loss_at(monkeypatch, call)  # the survey's 12 steps come first, then round 2's
    tr = training_run(synth.micrographs, synth.names, synth.labels, radius=10, seed=0, **TINY)
    events = []
    with pytest.raises(TrainingError, match=f"round {1 if round_ == 'survey' else 2}: training stopped at step "
                                            f"{call - (12 if round_ == 'final' else 0)} .*diverged"):
        for ev in tr.run():
            events.append(ev)
    assert events[-1].kind == "error"
    best = tr.best
    assert best is not None and best.metrics["round"] == round_
    assert np.isfinite(best.metrics["threshold"]) and "diverged" in best.metrics["kept"]
    scores = [float(v.float().abs().max()) for v in best.state_dict.values() if v.is_floating_point()]
    assert all(np.isfinite(scores))
    cands = tr.candidates(best)
    assert np.isfinite(cands["score"]).all() and (cands["score"] >= best.metrics["threshold"]).any()


def test_cli_train_that_diverges_writes_the_last_good_weights_and_fails(synth, monkeypatch, tmp_path, capsys):
    from napari_pupick import cli
    from napari_pupick.io import write_coordinates, write_micrograph
    from napari_pupick.training import Checkpoint

    (tmp_path / "mics").mkdir()
    for name, im in zip(synth.names, synth.micrographs):
        write_micrograph(tmp_path / "mics" / f"{name}.mrc", im)
    write_coordinates(synth.labels, tmp_path / "labels.star")
    _inflate_loss_at(monkeypatch, 15)
    out = tmp_path / "model.pt"
    rc = cli.main(["train", str(tmp_path / "mics"), "--labels", str(tmp_path / "labels.star"), "--radius", "10",
                   "--downsample", "1", "--epochs", "2", "--steps", "6", "--init", "none", "--quiet",
                   "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "round 2: training stopped at step 3" in err and str(out) in err
    assert "Traceback" not in err
    ckpt = Checkpoint.load(out)
    assert ckpt.metrics["round"] == "final" and np.isfinite(ckpt.metrics["threshold"])
