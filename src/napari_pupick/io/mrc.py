"""Micrographs on disk: MRC/MRCS (``mrcfile``), TIFF (``tifffile``) and 8/16-bit PNG or JPEG (Pillow) files, one
by one or as a lazy stack.

Conventions
-----------
- An image is indexed ``[row, column]`` = ``[y, x]`` exactly as ``mrcfile`` reads it; shapes are ``(H, W)``.
- A micrograph's *name* is its file name without the micrograph extension (:func:`micrograph_name`); names are
  how coordinates find their micrograph everywhere in napari-pupick.
- ``.mrc``, PNG and JPEG files hold one micrograph each. PNG and JPEG (8- or 16-bit grey) are read as float32;
  an RGB file whose three channels are equal, as some picking sets ship them, is read as its first channel; a
  colour image is refused. ``.mrcs`` files may hold several (one per section);
  :func:`read_micrograph` refuses those and :func:`open_stack` expands them into one plane per section, named
  ``<stem>_<section>`` (0-based, zero-padded) when a file has more than one section.
- Pixel size comes from the MRC header's voxel size, rounded to 4 decimals; ``0.0`` means unknown (TIFF, PNG and
  JPEG files, or headers that do not carry it).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_pupick.errors import MicrographError

__all__ = [
    "MICROGRAPH_EXTENSIONS",
    "MicrographStack",
    "list_micrographs",
    "micrograph_info",
    "micrograph_name",
    "open_stack",
    "read_micrograph",
    "write_micrograph",
]

#: File extensions read as micrographs (compared case-insensitively).
MICROGRAPH_EXTENSIONS = (".mrc", ".mrcs", ".tif", ".tiff", ".png", ".jpg", ".jpeg")
_MRC_EXTENSIONS = (".mrc", ".mrcs")
_PIL_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Pillow image modes read as micrographs (RGB-like modes: when grey); their pixels are returned as float32.
_PIL_MODES = ("L", "I;16", "I;16L", "I;16B", "I", "F", "LA", "RGB", "RGBA", "P", "PA")
_STACK_EXTENSIONS = (".mrcs", ".tif", ".tiff")
_MRC_HEADER_BYTES = 1024


def micrograph_name(path) -> str:
    """The micrograph's name: its file name without directories and without a micrograph extension.

    Only the extensions in :data:`MICROGRAPH_EXTENSIONS` are stripped, so names with dots survive
    (``"May08_03.05.02.mrc"`` -> ``"May08_03.05.02"``, ``"May08_03.05.02"`` -> ``"May08_03.05.02"``).
    Works on RELION-style relative paths in STAR files too (``"MotionCorr/job002/a.mrc"`` -> ``"a"``).
    """
    base = os.path.basename(os.fspath(path).rstrip("/\\"))
    base = base.rsplit("\\", 1)[-1]  # Windows-style directories written into STAR files
    lower = base.lower()
    for ext in sorted(MICROGRAPH_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext) and len(base) > len(ext):
            return base[: -len(ext)]
    return base


def _is_micrograph_file(path: Path) -> bool:
    return path.suffix.lower() in MICROGRAPH_EXTENSIONS and not path.name.startswith(".")


# ----------------------------------------------------------------------------------------------------------------
# Headers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """What one file holds, read from its header only."""

    path: Path
    n_sections: int
    shape: tuple  # (H, W) of one section
    dtype: np.dtype
    pixel_size: float = 0.0
    data_range: tuple | None = None  # (dmin, dmax) from the header when it looks valid


_MRC_MODES = (0, 1, 2, 3, 4, 6, 12, 101)


def _check_mrc_start(path: Path, size: int) -> None:
    """Reject files whose first 1024 bytes cannot be an MRC header, before mrcfile tries (and, for a garbage
    extended-header length, allocates gigabytes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MRC_HEADER_BYTES)
    except OSError as exc:
        raise MicrographError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if len(head) < _MRC_HEADER_BYTES:
        raise MicrographError(f"{path}: not an MRC file (only {len(head)} bytes; an MRC header alone is 1024)")
    for order in "<>":
        nx, ny, nz, mode = (int(v) for v in np.frombuffer(head[:16], dtype=f"{order}i4"))
        nsymbt = int(np.frombuffer(head[92:96], dtype=f"{order}i4")[0])
        if mode in _MRC_MODES and min(nx, ny, nz) > 0 and 0 <= nsymbt <= size - _MRC_HEADER_BYTES:
            return
    has_id = head[208:212] == b"MAP "
    raise MicrographError(
        f"{path}: not an MRC file ({'header values make no sense' if has_id else 'no MAP identifier'}: "
        "no valid mode, dimensions and extended-header length)"
    )


def _mrc_header(path: Path) -> _Header:
    import mrcfile
    from mrcfile.utils import dtype_from_mode

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MicrographError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    _check_mrc_start(path, size)
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
                voxel = mrc.voxel_size
        except (ValueError, OSError, EOFError, OverflowError, MemoryError) as exc:
            problems.append(str(exc))
            header = None
    problems += [str(w.message) for w in caught]
    if header is None:
        raise MicrographError(f"{path}: not an MRC file ({'; '.join(problems) or 'unreadable header'})")
    has_map_id = bytes(header.map) == b"MAP "
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    try:
        dtype = np.dtype(dtype_from_mode(header.mode))
    except ValueError:
        dtype = None
    if dtype is None:
        detail = "; ".join(problems + [f"unsupported MRC mode {int(header.mode)}"])
        raise MicrographError(f"{path}: not an MRC file, or an unsupported kind ({detail})")
    if min(nx, ny, nz) < 1 or (not has_map_id and max(nx, ny, nz) > 2**20):
        detail = "; ".join(problems + [f"implausible dimensions nx={nx}, ny={ny}, nz={nz}"])
        raise MicrographError(f"{path}: not an MRC file ({detail})")
    if dtype.kind == "c":
        raise MicrographError(f"{path}: complex-valued MRC data (mode {int(header.mode)}); a micrograph is real")
    expected = _MRC_HEADER_BYTES + int(header.nsymbt) + nx * ny * nz * dtype.itemsize
    if size < expected:
        raise MicrographError(
            f"{path}: truncated MRC file: the header announces {'' if nz == 1 else f'{nz} x '}{ny} x {nx} "
            f"pixels of {dtype} "
            f"({expected} bytes in all) but the file has only {size} bytes"
        )
    dmin, dmax = float(header.dmin), float(header.dmax)
    data_range = (dmin, dmax) if np.isfinite([dmin, dmax]).all() and dmax > dmin else None
    try:
        pixel_size = round(float(voxel.x), 4)
    except (TypeError, ValueError):
        pixel_size = 0.0
    if not np.isfinite(pixel_size) or pixel_size < 0:
        pixel_size = 0.0
    return _Header(path, nz, (ny, nx), dtype, pixel_size, data_range)


def _tiff_header(path: Path) -> _Header:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
    except Exception as exc:  # tifffile raises many kinds of errors on bad files
        raise MicrographError(f"{path}: not a readable TIFF file ({exc})") from exc
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 2:
        n = 1
    elif len(shape) == 3:
        n, shape = shape[0], shape[1:]
    else:
        raise MicrographError(f"{path}: TIFF image of shape {shape}; expected a 2-D grey-scale micrograph")
    if len(shape) == 2 and min(shape) <= 4 and n > 4:  # (H, W, 3) colour images end up here
        raise MicrographError(f"{path}: TIFF image looks like a colour image (shape {(n, *shape)})")
    if dtype.kind == "c" or dtype.kind not in "iufb":
        raise MicrographError(f"{path}: TIFF pixels of type {dtype}; expected real numbers")
    return _Header(path, int(n), (int(shape[0]), int(shape[1])), dtype, 0.0, None)


def _pil_header(path: Path) -> _Header:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode, (width, height), frames = img.mode, img.size, getattr(img, "n_frames", 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        kind = "PNG" if path.suffix.lower() == ".png" else "JPEG"
        raise MicrographError(f"{path}: not a readable {kind} file ({exc})") from exc
    if mode not in _PIL_MODES:
        raise MicrographError(f"{path}: image mode {mode!r} (e.g. 1-bit or CMYK); expected a grey-scale micrograph "
                              "(8- or 16-bit)")
    if frames > 1:
        raise MicrographError(f"{path}: an animated image of {frames} frames; expected one micrograph")
    return _Header(path, 1, (int(height), int(width)), np.dtype(np.float32), 0.0, None)


def _load_pil(path: Path) -> np.ndarray:
    """Pixels of a PNG/JPEG file as (H, W) float32 (the grey levels as numbers); RGB-like modes only when grey."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("P", "PA"):
                img = img.convert("RGBA" if mode == "PA" else "RGB")
            data = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
        raise MicrographError(f"{path}: cannot read the pixels ({exc})") from exc
    if data.ndim == 3:
        grey = data[..., 0]
        colours = data[..., :3] if data.shape[-1] >= 3 else data[..., :1]
        if not (colours == grey[..., None]).all():
            raise MicrographError(f"{path}: a colour image (its red, green and blue channels differ); expected a "
                                  "grey-scale micrograph")
        data = grey
    return np.ascontiguousarray(data, dtype=np.float32)


def _read_header(path) -> _Header:
    path = Path(path)
    if not path.exists():
        raise MicrographError(f"{path}: no such file")
    if path.is_dir():
        raise MicrographError(f"{path}: is a folder; expected a micrograph file ({', '.join(MICROGRAPH_EXTENSIONS)})")
    if path.suffix.lower() in (".tif", ".tiff"):
        return _tiff_header(path)
    if path.suffix.lower() in _PIL_EXTENSIONS:
        return _pil_header(path)
    return _mrc_header(path)


def micrograph_info(path) -> dict:
    """Shape, dtype and pixel size of a micrograph file, from its header only (no pixels are read).

    Parameters
    ----------
    path : str or Path
        An ``.mrc``, ``.mrcs``, TIFF, PNG or JPEG file.

    Returns
    -------
    dict
        ``shape``: ``(H, W)``, or ``(N, H, W)`` for a file with N > 1 sections; ``dtype``: numpy dtype as stored;
        ``pixel_size``: Angstrom per pixel rounded to 4 decimals, 0.0 when unknown; ``n_sections``: N.

    Raises
    ------
    MicrographError
        If the file is missing, not a readable micrograph file, or shorter than its header announces.
    """
    h = _read_header(path)
    shape = h.shape if h.n_sections == 1 else (h.n_sections, *h.shape)
    return {"shape": tuple(shape), "dtype": h.dtype, "pixel_size": h.pixel_size, "n_sections": h.n_sections}


# ----------------------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------------------


def _check_finite(plane: np.ndarray, path, section: int | None = None) -> np.ndarray:
    if plane.dtype.kind == "f":
        finite = np.isfinite(plane)
        if not finite.all():
            bad = int(plane.size - np.count_nonzero(finite))
            where = f" (section {section})" if section is not None else ""
            raise MicrographError(
                f"{path}{where}: {bad} of {plane.size} pixels are NaN or infinite; fix or replace the micrograph"
            )
    return plane


def _load_plane(path, section: int = 0, dtype=None) -> np.ndarray:
    """Read one section of a micrograph file into memory, as a native-byte-order (H, W) array.

    Raises MicrographError naming the file when the pixels cannot be read or are not all finite.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                data = tif.asarray(key=section) if len(series.pages) > 1 else series.asarray()
        except Exception as exc:
            raise MicrographError(f"{path}: cannot read TIFF pixels ({exc})") from exc
        plane = np.asarray(data)
        while plane.ndim > 2 and plane.shape[0] == 1:
            plane = plane[0]
        if plane.ndim == 3:  # one page holding several sections
            plane = plane[section]
        stacked = section > 0 or len(series.pages) > 1
    elif path.suffix.lower() in _PIL_EXTENSIONS:
        plane, stacked = _load_pil(path), False
    else:
        import mrcfile

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
                    data = mrc.data
                    if data is None:
                        problems = "; ".join(str(w.message) for w in caught) or "no data block"
                        raise MicrographError(f"{path}: cannot read MRC pixels ({problems})")
                    stacked = data.ndim == 3
                    # copy out of the memory map before it closes
                    plane = np.array(data[section] if stacked else data)
            except MicrographError:
                raise
            except (ValueError, OSError) as exc:
                raise MicrographError(f"{path}: cannot read MRC pixels ({exc})") from exc
    if plane.ndim != 2:
        raise MicrographError(f"{path}: section {section} has shape {plane.shape}; expected a 2-D image")
    if not plane.dtype.isnative:
        plane = plane.astype(plane.dtype.newbyteorder("="))
    if dtype is not None and plane.dtype != dtype:
        plane = plane.astype(dtype)
    return _check_finite(plane, path, section if stacked else None)


def read_micrograph(path) -> np.ndarray:
    """Read one 2-D micrograph into memory.

    Parameters
    ----------
    path : str or Path
        An ``.mrc``/``.mrcs`` file with one section, a single-image TIFF file, or a grey PNG/JPEG file.

    Returns
    -------
    ndarray
        Shape (H, W), in the dtype stored in the file (float32, uint16, int8...), native byte order.

    Raises
    ------
    MicrographError
        If the file is missing, not an MRC/TIFF file, truncated, has more than one section (a 3-D volume in
        ``.mrc``; a stack in ``.mrcs``/TIFF, for which use :func:`open_stack`), or holds NaN/infinite pixels
        (the message gives their count).
    """
    h = _read_header(path)
    if h.n_sections != 1:
        if h.path.suffix.lower() in _STACK_EXTENSIONS:
            raise MicrographError(
                f"{h.path}: a stack of {h.n_sections} micrographs of {h.shape[0]} x {h.shape[1]} pixels; "
                "read_micrograph reads one 2-D micrograph: open the stack with open_stack()"
            )
        raise MicrographError(
            f"{h.path}: 3-D data ({h.n_sections} x {h.shape[0]} x {h.shape[1]}), expected a 2-D micrograph "
            "(a stack of micrographs should be saved as .mrcs and opened with open_stack())"
        )
    return _load_plane(h.path, 0)


def write_micrograph(path, image, pixel_size: float | None = None) -> Path:
    """Write one 2-D image as a float32 MRC file, atomically (a temporary file renamed over ``path``).

    Parameters
    ----------
    path : str or Path
        Target file (its folder must exist).
    image : array_like, shape (H, W)
    pixel_size : float, optional
        Stored as the voxel size (Angstrom per pixel).

    Returns
    -------
    Path
        ``path``. On any error no file is left behind and an existing ``path`` is unchanged.
    """
    import mrcfile

    path = Path(path)
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2:
        raise MicrographError(f"{path}: expected a 2-D image to write, got shape {data.shape}")

    def write(tmp):
        mrc = mrcfile.new(tmp, overwrite=True)
        try:
            mrc.set_data(data)
            if pixel_size:
                mrc.voxel_size = float(pixel_size)
            mrc.flush()
        finally:
            stream = getattr(mrc, "_iostream", None)
            try:
                mrc.close()
            finally:  # mrcfile's close() leaves the file open when its own flush fails (a full disk)
                if stream is not None and not stream.closed:
                    stream.close()

    from napari_pupick.io.atomic import atomic_write

    return atomic_write([(path, write)])[0]


# ----------------------------------------------------------------------------------------------------------------
# Many micrographs
# ----------------------------------------------------------------------------------------------------------------


def list_micrographs(folder_or_paths) -> list[Path]:
    """The micrograph files in a folder, or a checked list of files, sorted by path.

    Parameters
    ----------
    folder_or_paths : str, Path or sequence of them
        A folder (its files ending in .mrc, .mrcs, .tif, .tiff, .png, .jpg or .jpeg, not recursive, hidden files
        skipped), one file, or several files.

    Returns
    -------
    list of Path

    Raises
    ------
    MicrographError
        If a path does not exist, a listed file is not a micrograph file, or no micrograph is found.
    """
    if isinstance(folder_or_paths, (str, os.PathLike)):
        items = [Path(folder_or_paths)]
    else:
        items = [Path(p) for p in folder_or_paths]
    if not items:
        raise MicrographError("no micrograph paths given")
    found: list[Path] = []
    for item in items:
        if item.is_dir():
            files = [p for p in item.iterdir() if p.is_file() and _is_micrograph_file(p)]
            if not files and len(items) == 1:
                raise MicrographError(
                    f"{item}: no micrographs in this folder (looked for {', '.join(MICROGRAPH_EXTENSIONS)})"
                )
            found.extend(files)
        elif not item.exists():
            raise MicrographError(f"{item}: no such file or folder")
        elif item.suffix.lower() not in MICROGRAPH_EXTENSIONS:
            raise MicrographError(
                f"{item}: not a micrograph file (expected one of {', '.join(MICROGRAPH_EXTENSIONS)})"
            )
        else:
            found.append(item)
    if not found:
        raise MicrographError(f"no micrographs found in {', '.join(map(str, items))}")
    return sorted(set(found), key=lambda p: str(p))


class _LazyPlanes:
    """A read-only 3-D array-like whose planes are read from their files only when indexed.

    ``sources[i]`` is ``(path, section)``; dask wraps it with one chunk per plane.
    """

    def __init__(self, sources, shape, dtype):
        self.sources = list(sources)
        self.shape = (len(self.sources), int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.ndim = 3

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            path, section = self.sources[int(first)]
            return _load_plane(path, section, self.dtype)[rest]
        index = range(self.shape[0])[first]
        planes = [_load_plane(*self.sources[i], self.dtype)[rest] for i in index]
        if not planes:
            return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
        return np.stack(planes)


@dataclass
class MicrographStack:
    """Micrographs of one size as a lazy (N, H, W) dask array, one plane per micrograph.

    Attributes
    ----------
    data : dask.array.Array
        Shape (N, H, W), one chunk per plane. Building it read only the headers; a plane's pixels are read
        (through a memory map) when that plane is computed, and *then* checked: a plane with NaN/infinite pixels
        raises MicrographError naming its file at compute time, not when the stack is opened.
    names : list of str
        Micrograph name of each plane (file stem; ``<stem>_<section>`` for planes of multi-section ``.mrcs``).
    paths : list of Path
        File of each plane (a multi-section file appears once per section).
    sections : list of int
        Section of each plane within its file.
    pixel_size : float
        Angstrom per pixel from the headers (the most common non-zero value), 0.0 when unknown.
    data_range : tuple of float or None
        (min, max) over the headers' dmin/dmax when every header carries them, else None.
    """

    data: object
    names: list
    paths: list
    sections: list = field(default_factory=list)
    pixel_size: float = 0.0
    data_range: tuple | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def shape(self) -> tuple:
        """(N, H, W)."""
        return tuple(self.data.shape)

    def read(self, index: int) -> np.ndarray:
        """Pixels of plane ``index`` as an in-memory (H, W) array (checked for NaN/infinite values)."""
        return _load_plane(self.paths[index], self.sections[index], self.data.dtype)


def _describe_shapes(headers) -> str:
    groups: dict = {}
    for h in headers:
        groups.setdefault(h.shape, []).append(h.path.name)
    parts = []
    for shape, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{shape[0]} x {shape[1]} ({len(names)} file{'s' if len(names) > 1 else ''}: {shown})")
    return "; ".join(parts)


def open_stack(paths) -> MicrographStack:
    """Open micrographs of one size as one lazy stack, reading only their headers.

    Parameters
    ----------
    paths : str, Path or sequence of them
        A folder of micrographs, one file, or several files (see :func:`list_micrographs`). ``.mrcs`` and
        multi-page TIFF files contribute one plane per section.

    Returns
    -------
    MicrographStack
        ``data`` is a dask array of shape (N, H, W) built from per-plane memory-mapped reads; no pixel is read
        until a plane is computed. NaN/infinite pixels are detected then, by the per-plane loader, which raises
        MicrographError naming the file.

    Raises
    ------
    MicrographError
        If no micrograph is found, a file is not a valid MRC/TIFF or is truncated, a ``.mrc`` file is 3-D, or the
        micrographs differ in shape (the message lists each shape with its files).
    """
    import dask.array as da
    from dask.base import tokenize

    files = list_micrographs(paths)
    headers = [_read_header(p) for p in files]
    for h in headers:
        if h.n_sections > 1 and h.path.suffix.lower() not in _STACK_EXTENSIONS:
            raise MicrographError(
                f"{h.path}: 3-D data ({h.n_sections} x {h.shape[0]} x {h.shape[1]}), expected a 2-D micrograph "
                "(save stacks of micrographs as .mrcs)"
            )
    if len({h.shape for h in headers}) > 1:
        raise MicrographError(f"micrographs differ in size: {_describe_shapes(headers)}; a stack needs one size")
    dtype = np.result_type(*[h.dtype for h in headers])
    sources, names = [], []
    for h in headers:
        stem = micrograph_name(h.path)
        width = len(str(h.n_sections - 1))
        for s in range(h.n_sections):
            sources.append((h.path, s))
            names.append(stem if h.n_sections == 1 else f"{stem}_{s:0{width}d}")
    duplicates = [n for n, c in Counter(names).items() if c > 1]
    if duplicates:
        raise MicrographError(
            f"several micrographs share the name {duplicates[0]!r} (e.g. a .mrc and a .tif with one stem); "
            "names must be unique to match coordinates"
        )
    sizes = [h.pixel_size for h in headers if h.pixel_size > 0]
    pixel_size = Counter(sizes).most_common(1)[0][0] if sizes else 0.0
    ranges = [h.data_range for h in headers]
    data_range = None
    if all(r is not None for r in ranges):
        data_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    lazy = _LazyPlanes(sources, headers[0].shape, dtype)
    stamps = [(str(h.path), h.path.stat().st_mtime_ns, h.path.stat().st_size) for h in headers]
    name = "micrographs-" + tokenize(stamps, lazy.shape, str(dtype))
    data = da.from_array(
        lazy, chunks=(1, *lazy.shape[1:]), name=name, meta=np.empty((0, 0, 0), dtype), asarray=False,
        fancy=False, lock=False,
    )
    return MicrographStack(data, names, [s[0] for s in sources], [s[1] for s in sources], pixel_size, data_range)
