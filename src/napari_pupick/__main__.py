"""``python -m napari_pupick`` runs the ``pupick`` command line."""

import sys

from napari_pupick.cli import main

sys.exit(main())
