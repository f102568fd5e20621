"""Dock widget 4: export the picks above the threshold (STAR combined or per micrograph, CSV, Topaz, EMAN box)."""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, LineEdit, PushButton

from napari_pupick.widgets._common import PupickWidget, heading, text_label, wrap_path

__all__ = ["ExportWidget"]

_FORMATS = [("RELION STAR", "star"), ("CSV", "csv"), ("Topaz (tab-separated)", "topaz"), ("EMAN box", "box")]
_EXT = {"star": ".star", "csv": ".csv", "topaz": ".txt", "box": ".box"}


class ExportWidget(PupickWidget):
    """Write the shown picks (score >= threshold) in original micrograph pixels through the plugin's writers."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.format = ComboBox(label="format", choices=_FORMATS, value="star")
        self.per_micrograph = CheckBox(text="one file per micrograph (into a folder)", value=False)
        self.suffix = LineEdit(label="file suffix", value="",
                               tooltip="Per-micrograph files are <micrograph><suffix>.star; RELION's AutoPick "
                                       "naming uses _autopick")
        self.suffix.visible = False
        self.reviewed_only = CheckBox(text="only micrographs marked reviewed", value=False)
        self.path = FileEdit(label="save to", mode="w", value=str(Path.cwd() / "picks.star"))
        self.export_button = PushButton(text="Export picks")
        self.form = Container(widgets=[self.format, self.per_micrograph, self.suffix, self.reviewed_only, self.path,
                                       self.export_button], labels=True)
        self.form.margins = (0, 0, 0, 0)
        self.body.addWidget(heading("Export"))
        self.summary = text_label()
        self.body.addWidget(self.summary)
        self.body.addWidget(self.form.native)

        self.format.changed.connect(self._format_changed)
        self.per_micrograph.changed.connect(self._format_changed)
        self.export_button.changed.connect(lambda *_: self.export())
        for what in ("picks", "threshold"):
            self.subscribe(what, self._summarize)
        self._summarize(self.loop)

    def _format_changed(self, *_):
        per = bool(self.per_micrograph.value)
        self.suffix.visible = per
        current = Path(str(self.path.value))
        if per:
            self.path.mode = "d"
            if current.suffix:
                self.path.value = str(current.with_suffix(""))
        else:
            self.path.mode = "w"
            base = current.with_suffix("") if current.suffix else current
            self.path.value = str(base.with_suffix(_EXT[self.format.value]))

    def _summarize(self, loop) -> None:
        if "failed" in self.status.text():  # an error about picks that did not exist yet is stale now
            self.status.setText("")
        layer = loop.picks_layer
        if layer is None or layer not in self.viewer.layers or not len(layer.data):
            self.summary.setText("no picks yet: run Predict first")
            return
        per = loop.picks_per_micrograph()
        self.summary.setText(f"{int(per.sum())} picks with score >= {loop.threshold:.2f} on "
                             f"{int((per > 0).sum())} of {len(per)} micrographs")

    def export(self, path=None):
        """Export now (to ``path``, default the one in the widget); returns the written path(s)."""
        path = Path(str(path if path is not None else self.path.value))
        fmt, per = self.format.value, bool(self.per_micrograph.value)
        reviewed = bool(self.reviewed_only.value)
        written = self.report(lambda: self.loop.export(path, fmt, per_micrograph=per, suffix=self.suffix.value,
                                                       reviewed_only=reviewed), "Export")
        if written is not None:
            n = len(written) if isinstance(written, list) else 1
            table = self.loop.picks_table()
            count = int(table["micrograph"].isin(self.loop.reviewed).sum()) if reviewed else len(table)
            self.status.setText(f"wrote {count} picks" + (f" ({n} files)" if per else "") + f" to {wrap_path(path)}")
            self.status.setToolTip(str(path))
            from napari.utils.notifications import show_info

            # a notification shows its first line until expanded: the file name there, the whole path below
            show_info(f"Exported {count} picks to {Path(path).name}\n{path}")
        return written
