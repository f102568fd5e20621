"""The label-train-inspect loop on a napari viewer, as a Python API.

:class:`PickLoop` holds one picking session on one viewer: the micrograph layer, the fitted preprocessor, the
normalized micrographs, the labels, the current model, the cached score maps and the picks. Every dock widget is a
thin shell over one of its methods, and the same methods drive the loop from the napari console or a script:

>>> loop = PickLoop.for_viewer(viewer)                                   # doctest: +SKIP
>>> loop.set_micrographs("synthetic micrographs")                        # doctest: +SKIP
>>> loop.set_particle(radius=12)                                          # doctest: +SKIP
>>> loop.preprocess(method="gmm")                 # binning 'auto'        # doctest: +SKIP
>>> loop.add_positives_layer()                                           # doctest: +SKIP
>>> loop.train(epochs=4, steps_per_epoch=20)      # AutoTrainer          # doctest: +SKIP
>>> loop.predict()                                # at the model's threshold  # doctest: +SKIP
>>> loop.set_threshold(0.5)                       # by hand: kept on retrain  # doctest: +SKIP
>>> loop.export("picks.star")                                            # doctest: +SKIP

Long jobs come in two forms: ``iter_preprocess``, ``iter_train`` and ``iter_predict`` return generators of
:class:`LoopEvent` that touch no layer (a napari thread worker runs them; the widgets pass each event to
:meth:`PickLoop.handle` on the main thread, which updates the layers), and ``preprocess``, ``train`` and
``predict`` run the same generators to completion in the calling thread.

Coordinates: every layer the loop makes lies on the ORIGINAL micrograph grid. The normalized micrographs and the
score heatmap are binned by the downsampling factor ``s`` and shown with ``scale = s`` times the micrograph
layer's scale, so binned pixel ``(i, j)`` sits at original pixel ``(s i, s j)`` (the package's convention). Points
layers (positives, negatives, picks) carry the micrograph layer's scale, hold ``(plane, y, x)`` (or ``(y, x)`` for a
single micrograph) in original pixels, and have ``downsample = 1`` in their metadata, so the plugin's writers and
the exports need no scaling. Radii and margins are in original pixels too.

Corrections: deleting points from the picks layer records them as negative labels (the "negatives" layer), and a
point added to the picks layer moves to the "positives" layer. ``accept_selected`` / ``reject_selected`` (keys Y
and X) move picks to the labels; every correction can be undone (:meth:`PickLoop.undo`, Ctrl+Z) and redone
(:meth:`PickLoop.redo`, Ctrl+Shift+Z); :data:`napari_pupick.loop.keys.SHORTCUTS` lists the keys.
Retraining uses positives, negatives and the unlabeled rest, starting from the current model.

Nothing here imports Qt; torch and the heavy core modules are imported when first needed.
"""

from __future__ import annotations

from napari_pupick.loop.corrections import CorrectionsMixin
from napari_pupick.loop.jobs import JobsMixin
from napari_pupick.loop.keys import KeysMixin
from napari_pupick.loop.layers import NEGATIVES, PICKS, POSITIVES, SCORES, LayersMixin
from napari_pupick.loop.review import ReviewMixin
from napari_pupick.loop.session import DEFAULT_THRESHOLD, NMS_THRESHOLD, LoopEvent, Session

__all__ = ["DEFAULT_THRESHOLD", "NMS_THRESHOLD", "NEGATIVES", "PICKS", "POSITIVES", "SCORES", "LoopEvent", "PickLoop"]


class PickLoop(KeysMixin, ReviewMixin, CorrectionsMixin, JobsMixin, LayersMixin, Session):
    """One picking session on a napari viewer (see the module docstring).

    Parameters
    ----------
    viewer : napari.Viewer or napari.components.ViewerModel
    micrographs : Image layer or layer name, optional
        The micrographs: one (H, W) image or an (N, H, W) stack, in pixels, ideally with ``micrograph_names``
        metadata (as the plugin's reader and sample data give).

    Attributes
    ----------
    viewer : the viewer
    micrograph_layer, normalized_layer, positives_layer, negatives_layer, picks_layer, scores_layer : layers
        The layers of the session (None until made); ``names`` holds the micrograph name of each plane.
    preprocessor : Preprocessor or None
        The fitted downsampling and normalization; ``prepared`` caches the normalized planes (binned grid).
    radius : float
        Particle radius in original pixels (points are drawn with diameter ``2 * radius``; NMS radius default).
    expected_particles : float or None
        Expected particles per micrograph (sets the class prior of training); None: estimated by training.
    downsample : int or 'auto'
        Binning of :meth:`preprocess` ('auto': :func:`~napari_pupick.calibration.choose_downsample`).
    threshold : float
        Logit threshold of the shown (and exported) picks: the model's calibrated one unless set by hand
        (``threshold_by_hand``).
    nms_radius : float or None
        Non-maximum-suppression radius in original pixels (None: ``radius``).
    margin : float or None
        Picks closer than this to the micrograph border (original pixels) are dropped; None: the model's
        (:meth:`effective_margin`).
    checkpoint : Checkpoint or None
        The current model.
    scores : dict of int -> ndarray
        Cached logit maps (binned grid) per plane.
    """

