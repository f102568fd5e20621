"""Dock widget 1: preprocess the micrographs (binning, GMM or affine normalization) and start labelling."""

from __future__ import annotations

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton, SpinBox

from napari_pupick._reader import open_folders_with_pupick, opens_folders
from napari_pupick.widgets._common import PupickWidget, heading, text_label, wrap_path
from napari_pupick.widgets._plot import MixturePlot

__all__ = ["PreprocessWidget"]

_BINNING = [("auto", "auto")] + [(str(k), k) for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)]
_METHODS = [("GMM (dataset-wide mixture)", "gmm"), ("affine (mean / std)", "affine"), ("none", "none")]


def describe_mixture(gmm) -> str:
    """The fitted mixture in normalized units (the dominant component is mean 0, sd 1 by construction)."""
    mu, sd = gmm.dominant
    share = gmm.p if gmm.p < 0.5 else 1.0 - gmm.p  # the other component's share of the pixels
    other_mu, other_sd = (gmm.mu1, gmm.s1) if gmm.p < 0.5 else (gmm.mu0, gmm.s0)
    if share <= 0 or sd <= 0:
        return "mixture: one component (ice): mean 0, sd 1"
    return (f"mixture (normalized units): ice mean 0, sd 1 ({1 - share:.0%} of the pixels); other component "
            f"mean {(other_mu - mu) / sd:+.2f}, sd {other_sd / sd:.2f} ({share:.0%})")


class PreprocessWidget(PupickWidget):
    """Pick the micrograph layer, bin and normalize it in a worker, show the fitted mixture; then set the particle
    size and create the positives layer with one click."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        # the particle comes first: the automatic binning is chosen from its radius
        self.radius = FloatSpinBox(label="particle radius (px)", value=self.loop.radius, min=1, max=2000,
                                   step=1, tooltip="In original micrograph pixels; points are drawn 2 x radius wide")
        self.expected = SpinBox(label="expected per micrograph", value=int(self.loop.expected_particles or 0),
                                min=0, max=100000,
                                tooltip="Roughly how many particles one micrograph holds (the class prior of "
                                        "training); 0: estimated from the labels by training")
        self.particles = Container(widgets=[self.radius, self.expected], labels=True)
        self.particles.margins = (0, 0, 0, 0)
        self.body.addWidget(heading("Particle"))
        self.body.addWidget(self.particles.native)
        self.particle_info = text_label()
        self.body.addWidget(self.particle_info)

        self.open_button = PushButton(text="Open micrographs...")
        self.open_button.tooltip = "A folder of MRC / MRCS / TIFF micrographs of one size, opened as one stack"
        self.folders = CheckBox(text="File > Open Folder opens with napari-pupick", value=opens_folders(),
                                tooltip="Store napari's reader preference for folders (no 'Choose reader' "
                                        "dialog); untick to give folders back to napari's choice")
        self.layer = ComboBox(label="micrographs", choices=self._image_layers, nullable=False)
        self.downsample = ComboBox(label="binning", choices=_BINNING, value="auto",
                                   tooltip="auto: the factor that makes the particle radius about 12 binned px "
                                           "(where the network works best)")
        self.method = ComboBox(label="normalization", choices=_METHODS, value="gmm")
        self.run_button = PushButton(text="Preprocess")
        self.form = Container(widgets=[self.layer, self.downsample, self.method, self.run_button], labels=True)
        self.form.margins = (0, 0, 0, 0)
        self.body.addWidget(heading("Micrographs"))
        self.body.addWidget(self.open_button.native)
        self.body.addWidget(self.folders.native)
        self.body.addWidget(self.form.native)
        self.binning_info = text_label()
        self.body.addWidget(self.binning_info)
        self.plot = MixturePlot()
        self.body.addWidget(self.plot)

        self.label_button = PushButton(text="Label particles (positives layer)")
        self.body.addWidget(heading("Labels"))
        self.body.addWidget(self.label_button.native)
        self.labels_info = text_label()
        self.body.addWidget(self.labels_info)

        self.run_button.changed.connect(self.run)
        self.open_button.changed.connect(lambda *_: self.open_micrographs())
        self.folders.changed.connect(lambda v: open_folders_with_pupick(bool(v)))
        self.label_button.changed.connect(self.add_positives)
        self.layer.changed.connect(self._layer_changed)
        self.radius.changed.connect(lambda v: self.report(lambda: self.loop.set_particle(radius=v), "radius"))
        self.radius.changed.connect(self._hint)
        self.expected.changed.connect(
            lambda v: self.report(lambda: self.loop.set_particle(expected_particles=v), "expected particles"))
        self.downsample.changed.connect(self._hint)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._reset_choices)
        self.subscribe("micrographs", self._sync)
        self.subscribe("preprocessed", self._show_mixture)
        self.subscribe("labels", self._labels_changed)
        self.subscribe("micrographs", self._labels_changed)
        if self.loop.micrograph_layer is not None and self.loop.micrograph_layer in self.viewer.layers:
            self._sync(self.loop)  # a session started elsewhere (another widget, the console) keeps its layer
            if self.loop.mixture is not None:
                self._show_mixture(self.loop)
        else:
            self._layer_changed(self.layer.value)

    # -- choices and sync ----------------------------------------------------------------------------------------

    def _image_layers(self, *_):
        from napari.layers import Image

        skip = {self.loop.normalized_layer, self.loop.scores_layer}
        return [(la.name, la) for la in self.viewer.layers
                if isinstance(la, Image) and la not in skip and not la.rgb and la.data.ndim in (2, 3)]

    def _reset_choices(self, *_):
        self.layer.reset_choices()

    def _layer_changed(self, layer) -> None:
        if layer is not None and layer is not self.loop.micrograph_layer:
            self.report(lambda: self.loop.set_micrographs(layer), "micrographs")
        self._hint()

    def _sync(self, loop) -> None:
        if loop.micrograph_layer is not None and self.layer.value is not loop.micrograph_layer:
            self._reset_choices()
            self.layer.value = loop.micrograph_layer
        self.radius.value = loop.radius
        self.expected.value = int(round(loop.expected_particles or 0))
        self._hint()

    def _hint(self, *_):
        """The binning the chosen setting gives, in pixels (and Angstrom when the header has a pixel size)."""
        loop = self.loop
        try:
            b = loop.binning(self.downsample.value)
        except ValueError as exc:
            self.binning_info.setText(str(exc))
            return
        px = loop.pixel_size if loop.micrograph_layer is not None else None
        how = "auto" if b.auto else "set here"
        text = (f"binning {b.factor} ({how}): particle radius {b.radius:g} px -> {b.binned_radius:.3g} binned px")
        if px:
            text += f"; {px:.3g} \u00c5/px -> {b.binned_pixel_size:.3g} \u00c5 per binned pixel"
        if b.warning:
            text += f"<br><span style='color:#ffb050'>{b.warning}</span>"
        self.binning_info.setText(text)
        self.particle_info.setText(f"radius {loop.in_angstrom(b.radius)} (diameter, the box: "
                                   f"{loop.in_angstrom(2 * b.radius)})" if px else
                                   "pixel size unknown (not in the file header): sizes in pixels")

    def open_micrographs(self, folder=None):
        """Open a folder of micrographs (asks for one when ``folder`` is None) as one stack with this plugin's
        reader and make it the session's micrographs; returns the new layer (None if cancelled or failed)."""
        if folder is None:
            from qtpy.QtWidgets import QFileDialog

            folder = QFileDialog.getExistingDirectory(self, "Open micrographs (a folder of MRC / TIFF files)")
            if not folder:
                return None
        layers = self.report(lambda: self.viewer.open(str(folder), plugin="napari-pupick"), "Open micrographs")
        images = [la for la in layers or [] if type(la).__name__ == "Image"]
        if not images:
            if layers is not None:
                self.status.setText(f"no micrographs in {wrap_path(folder)}")
            return None
        self._reset_choices()
        self.layer.value = images[0]
        self.status.setText(f"opened {len(self.loop.names)} micrograph(s) from {wrap_path(folder)}")
        return images[0]

    def busy_widgets(self) -> list:
        return [self.run_button, self.layer, self.downsample, self.method]

    # -- actions -------------------------------------------------------------------------------------------------

    def run(self, *_):
        """Bin and normalize the chosen micrographs in a worker; adds or refreshes the normalized layer."""
        layer, s, method = self.layer.value, self.downsample.value, self.method.value
        return self.start_job(lambda: self.loop.iter_preprocess(layer, s, method), "Preprocess")

    def _show_mixture(self, loop) -> None:
        if loop.mixture is not None:
            self.plot.plot_mixture(*loop.mixture)
        pre = loop.preprocessor
        gmm = getattr(pre, "gmm", None)
        text = f"{len(loop.names)} micrograph(s) binned by {pre.downsample}, {pre.method} normalization"
        if gmm is not None:
            text += "<br>" + describe_mixture(gmm)
        self.status.setText(text)
        if self.downsample.value != "auto" and self.downsample.value != pre.downsample:
            self.downsample.value = pre.downsample if pre.downsample in dict(_BINNING).values() else "auto"
        if self.method.value != pre.method:
            self.method.value = pre.method

    def add_positives(self, *_):
        """Create (or select) the positives Points layer with the particle size set here."""
        layer = self.report(lambda: self.loop.add_positives_layer(self.radius.value, self.expected.value),
                            "Label particles")
        if layer is not None:
            self.status.setText(f"Click particles on layer '{layer.name}': points go on the micrograph shown.")
            self._labels_changed(self.loop)
        return layer

    def _labels_changed(self, loop) -> None:
        """The count of labels, kept current (clicks, deletes, undo, corrections)."""
        if loop.micrograph_layer is None or not loop._alive(loop.positives_layer):
            self.labels_info.setText("")
            return
        positives, negatives = loop.labels()
        text = f"{len(positives)} labelled particles on {positives['micrograph'].nunique()} micrograph(s)"
        if len(negatives):
            text += f", {len(negatives)} rejected picks"
        self.labels_info.setText(text)
