"""The whole loop in one dock widget that fits the screen: the current micrograph, the micrograph table, and the
steps as tabs (each a scroll area, so no step asks for more height than the panel gets)."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_pupick.loop import PickLoop
from napari_pupick.loop.keys import SHORTCUTS, shortcut_help

__all__ = ["MicrographTable", "PupickPanel"]

COLUMNS = ["micrograph", "labels", "rejected", "picks", "unsure", "\u2713"]
_TIPS = ["The micrograph (click a row to show it)", "Particles labelled on it (positives)",
         "Picks rejected on it (negative labels)", "Picks at or above the threshold (- : not scored yet)",
         "Share of its candidates within 1 logit of the threshold: where the model hesitates",
         "Reviewed: tick when done; Export can keep only the reviewed micrographs"]


class _Number(QTableWidgetItem):
    """A cell that sorts by its number (NaN last), not by its text."""

    def __init__(self, value: float, text: str):
        super().__init__(text)
        self.setData(Qt.ItemDataRole.UserRole, float(value))
        self.setFlags(self.flags() & ~Qt.ItemFlag.ItemIsEditable)

    def __lt__(self, other):
        a = self.data(Qt.ItemDataRole.UserRole)
        b = other.data(Qt.ItemDataRole.UserRole)
        a = np.inf if a is None or np.isnan(a) else a
        b = np.inf if b is None or np.isnan(b) else b
        return a < b


class MicrographTable(QWidget):
    """Each micrograph with its labels, rejected picks, picks at the threshold, share of uncertain candidates and a
    reviewed checkbox; sortable; a click shows the micrograph. **Label next** goes to the micrograph to label
    next (most uncertain scores, fewest labels)."""

    def __init__(self, loop: PickLoop):
        super().__init__()
        self.loop = loop
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.current = QLabel()
        self.current.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.next_button = QPushButton("Label next")
        self.next_button.setToolTip("Go to the unreviewed micrograph whose candidates lie closest to the threshold "
                                    "and which has the fewest labels (after scoring)")
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("Undo the last correction (Ctrl+Z)")
        self.redo_button = QPushButton("Redo")
        self.redo_button.setToolTip("Redo (Ctrl+Shift+Z)")
        row = QHBoxLayout()
        row.addWidget(self.current, 1)
        for button in (self.undo_button, self.redo_button, self.next_button):
            row.addWidget(button)
        layout.addLayout(row)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        for c, tip in enumerate(_TIPS):
            self.table.horizontalHeaderItem(c).setToolTip(tip)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        metrics = self.fontMetrics()
        for c in range(1, len(COLUMNS)):  # numbers: as wide as the header word or "9999", no wider
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.Fixed)
            header.resizeSection(c, max(metrics.horizontalAdvance(COLUMNS[c]), metrics.horizontalAdvance("9999"))
                                 + 12)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 6)
        # compact headers: napari's theme pads each section generously, and six columns share ~400 px
        header.setStyleSheet("QHeaderView::section { padding: 1px 3px; }")
        self.table.setStyleSheet("QTableWidget::item { padding: 0px 3px; }")
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setSortingEnabled(True)
        self.table.sortItems(0, Qt.SortOrder.AscendingOrder)  # Qt's default indicator is descending
        self.table.setMinimumHeight(80)
        layout.addWidget(self.table)
        self._filling = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(100)  # many changes (slider drags, streaming picks) refill the table once
        self._timer.timeout.connect(self.refresh)
        self.table.cellClicked.connect(self._clicked)
        self.table.itemChanged.connect(self._item_changed)
        self.next_button.clicked.connect(self.go_next)
        self.undo_button.clicked.connect(lambda *_: loop.undo())
        self.redo_button.clicked.connect(lambda *_: loop.redo())
        loop.connect("undo", self._undo_changed)
        self._undo_changed(loop)
        for what in ("micrographs", "labels", "picks", "threshold", "review", "model"):
            loop.connect(what, self._schedule)
        loop.viewer.dims.events.current_step.connect(self._show_current)
        self.destroyed.connect(lambda *_: (loop.disconnect(self._schedule), loop.disconnect(self._undo_changed)))
        self.refresh()

    def rows_height(self, rows: int) -> int:
        """Height (px) of the table showing ``rows`` rows, plus the line above it."""
        t = self.table
        row = t.rowHeight(0) if t.rowCount() else t.verticalHeader().defaultSectionSize()
        return (t.horizontalHeader().height() + rows * row + 2 * t.frameWidth()
                + max(self.current.sizeHint().height(), self.next_button.sizeHint().height()) + 16)

    def _undo_changed(self, loop) -> None:
        self.undo_button.setEnabled(loop.can_undo)
        self.redo_button.setEnabled(loop.can_redo)

    def _schedule(self, *_):
        self._timer.start()

    def refresh(self) -> None:
        """Fill the table from :meth:`PickLoop.micrograph_table`."""
        loop = self.loop
        if loop.micrograph_layer is None:
            self.table.setRowCount(0)
            self._show_current()
            return
        summary = loop.micrograph_table()
        self._filling = True
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(summary))
        for r, row in enumerate(summary.itertuples()):
            name = QTableWidgetItem(row.micrograph)
            name.setData(Qt.ItemDataRole.UserRole, int(row.plane))
            name.setFlags(name.flags() & ~Qt.ItemFlag.ItemIsEditable)
            name.setToolTip(row.micrograph)
            self.table.setItem(r, 0, name)
            self.table.setItem(r, 1, _Number(row.labels, str(row.labels)))
            self.table.setItem(r, 2, _Number(row.rejected, str(row.rejected)))
            self.table.setItem(r, 3, _Number(row.picks, str(row.picks) if row.scored else "-"))
            self.table.setItem(r, 4, _Number(row.uncertainty, "-" if np.isnan(row.uncertainty)
                                             else f"{row.uncertainty:.0%}"))
            check = _Number(float(row.reviewed), "")
            check.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
            check.setCheckState(Qt.CheckState.Checked if row.reviewed else Qt.CheckState.Unchecked)
            self.table.setItem(r, 5, check)
        self.table.setSortingEnabled(True)
        self._filling = False
        self.next_button.setEnabled(bool(loop.scores))
        self._show_current()

    def row_of(self, name: str) -> int:
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).text() == name:
                return r
        return -1

    def _clicked(self, row: int, column: int) -> None:
        item = self.table.item(row, 0)
        if item is not None:
            self.loop.set_plane(int(item.data(Qt.ItemDataRole.UserRole)))

    def _item_changed(self, item) -> None:
        if self._filling or item.column() != 5:
            return
        name = self.table.item(item.row(), 0).text()
        self.loop.set_reviewed(name, item.checkState() == Qt.CheckState.Checked)

    def go_next(self, *_) -> str | None:
        """Show the micrograph to label next; returns its name (None when nothing is scored)."""
        order = self.loop.label_next()
        if not order:
            return None
        self.loop.set_plane(self.loop.names.index(order[0]))
        return order[0]

    def _show_current(self, *_):
        loop = self.loop
        if loop.micrograph_layer is None or not loop.names:
            self.current.setText("no micrographs: <b>Open micrographs</b> or File > Open Folder")
            return
        plane = loop.current_plane()
        name = loop.names[plane]
        self.current.setText(f"<b>{name}</b> ({plane + 1} of {loop.n_planes})")
        r = self.row_of(name)
        if r >= 0 and self.table.currentRow() != r:
            self.table.blockSignals(True)
            self.table.selectRow(r)
            self.table.blockSignals(False)


class PupickPanel(QWidget):
    """One dock widget for the whole loop: the micrograph table above, the steps (Preprocess and label, Train,
    Predict and inspect, Export) as tabs below, in a splitter."""

    def __init__(self, napari_viewer):
        from napari_pupick.widgets._export import ExportWidget
        from napari_pupick.widgets._predict import PredictWidget
        from napari_pupick.widgets._preprocess import PreprocessWidget
        from napari_pupick.widgets._train import TrainWidget

        super().__init__()
        self.loop = PickLoop.for_viewer(napari_viewer)
        self.viewer = self.loop.viewer
        self.preprocess = PreprocessWidget(napari_viewer)
        self.train = TrainWidget(napari_viewer)
        self.predict = PredictWidget(napari_viewer)
        self.export = ExportWidget(napari_viewer)
        self.tabs = QTabWidget()
        for widget, title in ((self.preprocess, "1 Label"), (self.train, "2 Train"), (self.predict, "3 Pick"),
                              (self.export, "4 Export")):
            self.tabs.addTab(widget, title)  # each step scrolls its own controls
        self.micrographs = MicrographTable(self.loop)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.micrographs)
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 3)
        splitter.setChildrenCollapsible(False)
        self.splitter = splitter
        self._sized = False
        self.keys = QLabel(shortcut_help())
        self.keys.setWordWrap(True)
        self.keys.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.keys.setToolTip("<br>".join(f"<b>{key}</b>: {what}" for key, _, what in SHORTCUTS))
        self.keys.setStyleSheet("color: #9aa0a8; font-size: 11px")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(splitter)
        layout.addWidget(self.keys)
        self.setMinimumWidth(420)

    def showEvent(self, event):
        super().showEvent(event)
        if not self._sized:
            self._sized = True
            QTimer.singleShot(0, self.fit_table)  # once laid out

    def fit_table(self) -> None:
        """The table as tall as its rows (up to 10, at most a third of the panel); the steps get the rest."""
        total = self.splitter.height()
        top = min(self.micrographs.rows_height(min(max(self.loop.n_planes, 3), 10)), total // 3)
        self.splitter.setSizes([top, total - top])
