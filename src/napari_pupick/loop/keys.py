"""The loop's keyboard shortcuts: one table for the canvas (napari key bindings), the panel (Qt shortcuts), the
panel's help line and the user guide (no Qt)."""

from __future__ import annotations

__all__ = ["SHORTCUTS", "THRESHOLD_STEP", "KeysMixin", "bind_keys", "shortcut_help"]

#: How far one key press moves the threshold (logits).
THRESHOLD_STEP = 0.25

#: (key as napari and Qt write it, PickLoop method, what it does).
SHORTCUTS = [
    ("Ctrl+Z", "undo", "undo the last correction (picks and labels added, deleted, moved; accept, reject)"),
    ("Ctrl+Shift+Z", "redo", "redo"),
    ("N", "next_micrograph", "next micrograph"),
    ("Shift+N", "previous_micrograph", "previous micrograph"),
    ("Y", "accept_key", ("accept: the selected picks, or the pick under the mouse, become labelled particles "
                         "(on the negatives layer: take the rejection back as a particle)")),
    ("X", "reject_key", ("reject: the selected picks, or the pick under the mouse, become rejected picks "
                         "(on the positives layer: the label becomes a rejection)")),
    ("=", "threshold_up", f"raise the threshold by {THRESHOLD_STEP:g} (fewer picks)"),
    ("-", "threshold_down", f"lower the threshold by {THRESHOLD_STEP:g} (more picks)"),
]


def shortcut_help(html: bool = True) -> str:
    """The shortcuts in one short line (``html``: keys in bold), for the panel."""
    short = {"undo": "undo", "redo": "redo", "next_micrograph": "next", "previous_micrograph": "previous",
             "accept_key": "accept", "reject_key": "reject", "threshold_up": "threshold up",
             "threshold_down": "threshold down"}
    fmt = "<b>{}</b> {}" if html else "{} {}"
    return " · ".join(fmt.format(key, short[name]) for key, name, _ in SHORTCUTS)


def bind_keys(viewer, loop) -> None:
    """Bind the shortcuts on the viewer (they work while the canvas has the keyboard focus)."""
    for key, name, _ in SHORTCUTS:
        method = getattr(loop, name)

        def action(viewer, method=method):
            method()

        viewer.bind_key(key.replace("Ctrl+", "Control-").replace("Shift+", "Shift-"), action, overwrite=True)


class KeysMixin:
    """What the shortcuts do, on a :class:`~napari_pupick.loop.PickLoop`."""

    def _cursor(self):
        cursor = getattr(self.viewer, "cursor", None)
        return None if cursor is None else tuple(cursor.position)

    def next_micrograph(self) -> None:
        self.step_plane(1)

    def previous_micrograph(self) -> None:
        self.step_plane(-1)

    def accept_key(self) -> int:
        return self.accept_selected(self._cursor())

    def reject_key(self) -> int:
        return self.reject_selected(self._cursor())

    def threshold_up(self) -> None:
        self.set_threshold(self.threshold + THRESHOLD_STEP)

    def threshold_down(self) -> None:
        self.set_threshold(self.threshold - THRESHOLD_STEP)
