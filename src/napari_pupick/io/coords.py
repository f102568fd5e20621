"""Particle coordinates on disk <-> one pick table.

The pick table is a pandas DataFrame with exactly the columns :data:`COLUMNS`:

- ``micrograph`` (str): the micrograph's name, i.e. its file name without directories and extension
  (see :func:`napari_pupick.io.mrc.micrograph_name`);
- ``x``, ``y`` (float): particle centre, x = column index and y = row index of the micrograph array as
  ``mrcfile`` reads it, in pixels of the original (unbinned) micrograph;
- ``score`` (float): the picker's logit; NaN when the file carries no score (e.g. hand-made labels).

Formats (guessed from the extension, overridable with ``format=``):

========  =============  =======================================================================================
format    extensions     columns
========  =============  =======================================================================================
star      .star          RELION: ``rlnMicrographName``, ``rlnCoordinateX``, ``rlnCoordinateY``,
                         ``rlnAutopickFigureOfMerit`` (score). One file for all micrographs, or one file per
                         micrograph (no name column; the name comes from the file name).
csv       .csv           header row ``micrograph,x,y[,score]``.
topaz     .txt, .tsv     tab-separated, header ``image_name  x_coord  y_coord  [score]`` (Topaz's convention).
box       .box           EMAN, one file per micrograph, no header: ``x_corner y_corner width height [score]``;
                         centre = corner + size / 2.
========  =============  =======================================================================================

Per-micrograph files are named ``<micrograph>.<ext>``; on reading, RELION's ``_autopick`` and ``_manualpick``
suffixes are also stripped from the file name (``mic001_autopick.star`` -> ``mic001``). Readers accept the other
formats' column names too (``x_coord`` in a CSV, ``micrograph`` in a Topaz file...), case-insensitively.

Writing is atomic: each file is written to a temporary file in the target folder and renamed over the target
only when every file has been written; on failure the temporary files are removed and existing targets are left
untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from napari_pupick.errors import CoordinateError
from napari_pupick.io.atomic import _write_text
from napari_pupick.io.atomic import atomic_write as _atomic_write
from napari_pupick.io.mrc import micrograph_name

__all__ = [
    "COLUMNS",
    "FORMATS",
    "PER_MICROGRAPH_SUFFIXES",
    "as_pick_table",
    "format_coordinates",
    "guess_format",
    "match_micrographs",
    "read_coordinates",
    "validate_in_bounds",
    "write_coordinates",
    "write_micrograph_coordinates",
]

#: The pick table's columns, in order.
COLUMNS = ("micrograph", "x", "y", "score")

#: Format name -> file extensions (the first is used when writing).
FORMATS = {"star": (".star",), "csv": (".csv",), "topaz": (".txt", ".tsv"), "box": (".box",)}

#: Suffixes stripped from per-micrograph file names to get the micrograph name (RELION's naming).
PER_MICROGRAPH_SUFFIXES = ("_autopick", "_manualpick")

# Column names accepted for each table column (compared case-insensitively), in order of preference.
_ALIASES = {
    "micrograph": ("micrograph", "rlnMicrographName", "image_name", "micrograph_name", "image"),
    "x": ("x", "rlnCoordinateX", "x_coord", "x_coordinate"),
    "y": ("y", "rlnCoordinateY", "y_coord", "y_coordinate"),
    "score": ("score", "rlnAutopickFigureOfMerit", "figure_of_merit"),
}
# What each format needs, for error messages.
_NEEDED = {
    "star": "rlnCoordinateX and rlnCoordinateY (and rlnMicrographName in a file for several micrographs; "
    "rlnAutopickFigureOfMerit optional)",
    "csv": "micrograph, x and y (score optional)",
    "topaz": "image_name, x_coord and y_coord (score optional)",
    "box": "x_corner y_corner width height [score]",
}


def guess_format(path) -> str:
    """The coordinate format of ``path`` from its extension: 'star', 'csv', 'topaz' or 'box'.

    Raises CoordinateError for an unknown extension.
    """
    suffix = Path(path).suffix.lower()
    for fmt, extensions in FORMATS.items():
        if suffix in extensions:
            return fmt
    known = ", ".join(e for exts in FORMATS.values() for e in exts)
    raise CoordinateError(f"{path}: unknown coordinate file type {suffix or '(no extension)'!r}; known: {known}")


def _check_format(fmt: str, path) -> str:
    fmt = fmt.lower()
    if fmt == "tsv":
        fmt = "topaz"
    if fmt not in FORMATS:
        raise CoordinateError(f"{path}: unknown coordinate format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def _name_from_file(path: Path) -> str:
    """Micrograph name of a per-micrograph coordinate file: ``mic_autopick.star`` -> ``mic``."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for suffix in PER_MICROGRAPH_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem  # "x.tif.star" is micrograph "x.tif" (of x.tif.mrc), as RELION names it


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({"micrograph": pd.Series([], dtype=str), "x": pd.Series([], dtype=float),
                         "y": pd.Series([], dtype=float), "score": pd.Series([], dtype=float)})


def _find_column(columns, key: str):
    lower = {str(c).lower(): c for c in columns}
    for alias in _ALIASES[key]:
        if alias.lower() in lower:
            return lower[alias.lower()]
    return None


#: Largest coordinate magnitude accepted (pixels): anything larger is not a micrograph position.
MAX_COORDINATE = 1e7


def _numeric(values: pd.Series, what: str, path, allow_nan: bool) -> np.ndarray:
    """Column as float64: finite numbers (blanks become NaN where ``allow_nan``); anything else is an error
    naming the file, the data row and the value. Coordinates (``allow_nan`` False) must also lie within
    +-:data:`MAX_COORDINATE`."""
    if values.dtype.kind in "iufb":
        out = values.to_numpy(float)
        blank = np.isnan(out) if allow_nan else np.zeros(len(out), bool)
    else:
        text = values.astype(str).str.strip()
        blank = text.str.lower().isin(["", "nan", "<na>", "none", "na", "null"]).to_numpy().copy()
        if not allow_nan:
            blank[:] = False
        out = pd.to_numeric(text.where(~blank, "nan"), errors="coerce").to_numpy(float)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(out) & ~blank
        if not allow_nan:
            bad |= np.abs(out) > MAX_COORDINATE
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        limit = "" if allow_nan else f", within +-{MAX_COORDINATE:g} px"
        raise CoordinateError(
            f"{path}: {int(bad.sum())} value(s) of {what} are missing or not finite numbers{limit} "
            f"(first: data row {i + 1}, {values.iloc[i] if isinstance(values.iloc[i], str) else float(out[i])!r})"
        )
    return out


def _standardise(df: pd.DataFrame, path, default_name: str | None, fmt: str, from_file: bool = True) -> pd.DataFrame:
    """Map a raw table with any accepted column names onto :data:`COLUMNS`.

    Names read ``from_file`` are stripped of whitespace, directories and micrograph extensions; names of a table
    built in memory are kept as they are."""
    cols = {key: _find_column(df.columns, key) for key in _ALIASES}
    if cols["x"] is None or cols["y"] is None or (cols["micrograph"] is None and default_name is None):
        found = ", ".join(map(str, df.columns)) or "none"
        raise CoordinateError(f"{path}: no particle coordinates: found columns [{found}]; need {_NEEDED[fmt]}")
    n = len(df)
    if cols["micrograph"] is not None:
        raw = df[cols["micrograph"]].map(lambda v: v if isinstance(v, str) else str(v))
        names = raw.map({v: micrograph_name(v.strip()) for v in raw.unique()}).tolist() if from_file else \
            raw.tolist()
    else:
        names = [default_name] * n
    x = _numeric(df[cols["x"]], cols["x"], path, allow_nan=False)
    y = _numeric(df[cols["y"]], cols["y"], path, allow_nan=False)
    score = np.full(n, np.nan) if cols["score"] is None else _numeric(df[cols["score"]], cols["score"], path, True)
    return pd.DataFrame({"micrograph": pd.Series(names, dtype=str), "x": x, "y": y, "score": score})


def as_pick_table(table, path=None) -> pd.DataFrame:
    """Check a DataFrame and return a copy with exactly :data:`COLUMNS` (score NaN when absent).

    Accepts the other formats' column names (``rlnCoordinateX``, ``x_coord``...) too.
    """
    if not isinstance(table, pd.DataFrame):
        raise CoordinateError(f"{path or 'pick table'}: expected a pandas DataFrame, got {type(table).__name__}")
    return _standardise(table.reset_index(drop=True), path or "pick table", None, "csv", from_file=False)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as fh:
        return not fh.read(4096).strip() and path.stat().st_size < 4096


def _read_text(path: Path, fmt: str) -> str:
    """The whole file as text, read once (no cache: what is on disk now)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CoordinateError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CoordinateError(f"{path}: not a text file (byte {exc.start} is not UTF-8); need {_NEEDED[fmt]}") \
            from None


def _read_star(path: Path) -> pd.DataFrame:
    from napari_pupick.io.star import parse_star

    blocks = parse_star(_read_text(path, "star"), path)
    if not blocks:
        raise CoordinateError(f"{path}: no data blocks found: not a STAR file? Need {_NEEDED['star']}")
    tables, described = [], []
    for block in blocks:
        if block.columns:
            df = pd.DataFrame(block.rows, columns=block.columns, dtype=object) if block.rows else \
                pd.DataFrame(columns=block.columns, dtype=object)
        elif block.pairs:
            df = pd.DataFrame([block.pairs], dtype=object)
        else:
            continue
        described.append(f"data_{block.name}: [{', '.join(map(str, df.columns))}]")
        if _find_column(df.columns, "x") is not None and _find_column(df.columns, "y") is not None:
            tables.append((block.name, df))
    if not tables:
        raise CoordinateError(
            f"{path}: no particle coordinates: found {'; '.join(described) or 'no tables'}; need {_NEEDED['star']}"
        )
    # Several coordinate blocks without a name column: one block per micrograph, named by the block. Blocks that
    # share a name (two files concatenated) are all kept, in file order.
    by_block = len({name for name, _ in tables}) > 1
    parts = [
        _standardise(block, path, (name if by_block and name else _name_from_file(path)), "star")
        for name, block in tables
    ]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def _read_delimited(path: Path, sep: str, fmt: str) -> pd.DataFrame:
    try:
        header = pd.read_csv(path, sep=sep, nrows=0).columns
        if fmt == "topaz" and len(header) == 1 and any(ch in str(header[0]) for ch in " ,"):
            sep = r"[\s,]+"  # space- or comma-separated despite the extension
            header = pd.read_csv(path, sep=sep, engine="python", nrows=0).columns
        name_col = _find_column(header, "micrograph")
        # Everything stays text ("0001" is not 1; errors quote the value as written); _numeric converts.
        df = pd.read_csv(path, sep=sep, engine="python" if len(sep) > 1 else "c", dtype=str, keep_default_na=False)
        del name_col
    except pd.errors.EmptyDataError:
        return _empty_table()
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CoordinateError(f"{path}: cannot parse as {fmt} ({exc}); need {_NEEDED[fmt]}") from exc
    except (ValueError, AssertionError, IndexError, TypeError, OverflowError) as exc:  # pandas on odd files
        raise CoordinateError(f"{path}: cannot parse as {fmt} ({type(exc).__name__}: {exc}); need "
                              f"{_NEEDED[fmt]}") from exc
    names = [str(c) for c in df.columns]
    for c in names:  # pandas renames a repeated column "x" to "x.1"
        base, dot, tail = c.rpartition(".")
        if dot and tail.isdigit() and base in names:
            raise CoordinateError(f"{path}: column {base!r} appears more than once in the header")
    return _standardise(df, path, _name_from_file(path), fmt)


def _read_box(path: Path) -> pd.DataFrame:
    rows = []
    for i, line in enumerate(_read_text(path, "box").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) == 1 and "," in fields[0]:
            fields = fields[0].split(",")  # comma-separated values
        values = []
        for v in fields[:5]:
            try:
                values.append(float(v))
            except ValueError:
                hint = " (a decimal comma? use a point)" if "," in v else ""
                raise CoordinateError(f"{path}, line {i}: {v!r} is not a number{hint}; expected "
                                      f"{_NEEDED['box']}") from None
        if len(values) < 4:
            raise CoordinateError(f"{path}, line {i}: expected {_NEEDED['box']}, found {line.strip()!r}")
        bad = [t for v, t in zip(values[:4], fields) if not np.isfinite(v) or abs(v) > MAX_COORDINATE]
        if bad or (len(values) > 4 and np.isinf(values[4])):
            shown = bad[0] if bad else fields[4]
            raise CoordinateError(f"{path}, line {i}: value {shown!r} is not a finite number within "
                                  f"+-{MAX_COORDINATE:g} px")
        xc, yc, w, h = values[:4]
        rows.append((xc + w / 2, yc + h / 2, values[4] if len(values) > 4 else np.nan))
    if not rows:
        return _empty_table()
    arr = np.asarray(rows, float)
    name = _name_from_file(path)
    return pd.DataFrame({"micrograph": pd.Series([name] * len(arr), dtype=str), "x": arr[:, 0], "y": arr[:, 1],
                         "score": arr[:, 2]})


def _read_file(path: Path, fmt: str) -> pd.DataFrame:
    if _is_blank(path):
        return _empty_table()
    if fmt == "star":
        return _read_star(path)
    if fmt == "csv":
        return _read_delimited(path, ",", fmt)
    if fmt == "topaz":
        return _read_delimited(path, "\t", fmt)
    return _read_box(path)


def read_coordinates(path, format: str | None = None) -> pd.DataFrame:
    """Read particle coordinates into a pick table.

    Parameters
    ----------
    path : str or Path
        A coordinate file, or a folder of per-micrograph coordinate files (all of one format).
    format : {'star', 'csv', 'topaz', 'box'}, optional
        Overrides the format guessed from the extension (``.star``, ``.csv``, ``.txt``/``.tsv``, ``.box``).

    Returns
    -------
    DataFrame
        Columns ``micrograph, x, y, score`` in file order (score NaN when the file has none). Micrograph names
        are stems: directories and micrograph extensions are stripped; per-micrograph files without a name column
        are named after the file (``<name>.star``, ``<name>_autopick.star``, ``<name>.box``...).
        An empty file gives an empty table.

    Raises
    ------
    CoordinateError
        If the file is missing or unreadable, or lacks the needed columns (the message lists what was found and
        what is needed).
    """
    path = Path(path)
    if not path.exists():
        raise CoordinateError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path, format)
    fmt = _check_format(format, path) if format else guess_format(path)
    return _read_file(path, fmt)


def _read_folder(folder: Path, format: str | None) -> pd.DataFrame:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if format:
        fmt = _check_format(format, folder)
        chosen = [p for p in files if p.suffix.lower() in FORMATS[fmt]]
    else:
        by_format: dict[str, list] = {}
        for p in files:
            for f, exts in FORMATS.items():
                if p.suffix.lower() in exts:
                    by_format.setdefault(f, []).append(p)
        if len(by_format) > 1:
            found = ", ".join(f"{len(v)} {k}" for k, v in by_format.items())
            raise CoordinateError(f"{folder}: coordinate files of several formats ({found}); pass format=...")
        fmt, chosen = next(iter(by_format.items()), (None, []))
    if not chosen:
        known = ", ".join(e for exts in FORMATS.values() for e in exts)
        raise CoordinateError(f"{folder}: no coordinate files in this folder (looked for {known})")
    parts = [_read_file(p, fmt) for p in chosen]
    parts = [p for p in parts if len(p)] or [_empty_table()]
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _number(v: float) -> str:
    return np.format_float_positional(float(v), trim="-")


def _protect(name: str, ext: str = ".mrc") -> str:
    """The name as written so that reading gives it back: readers strip micrograph extensions, so a name that
    ends in one (``x.tif``, from ``x.tif.mrc``) gets ``ext`` appended."""
    return name if micrograph_name(name) == name else f"{name}{ext or '.mrc'}"


def _with_extension(name: str, ext: str) -> str:
    if ext and name.lower().endswith(ext.lower()) and len(name) > len(ext):
        return name
    return f"{name}{ext}" if ext else _protect(name)


def _check_names(table: pd.DataFrame, path, fmt: str, per_micrograph: bool) -> None:
    """Refuse micrograph names that no reader would give back (named error)."""
    for name in pd.unique(table["micrograph"]):
        problem = None
        if not name:
            problem = "is empty"
        elif name != name.strip():
            problem = "starts or ends with whitespace (readers strip it)"
        elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            problem = "holds a control character (tab, line break...)"
        elif "/" in name or "\\" in name:
            problem = "holds a path separator (readers take what follows the last one as the name)"
        elif per_micrograph and (name.startswith(".") or "\0" in name):
            problem = "cannot be used as a file name (hidden, or holds a NUL)"
        elif per_micrograph and any(name.endswith(s) for s in PER_MICROGRAPH_SUFFIXES):
            problem = f"ends in a suffix ({', '.join(PER_MICROGRAPH_SUFFIXES)}) that readers strip from file names"
        elif fmt == "star" and not per_micrograph:
            from napari_pupick.io.star import format_value

            format_value(name, f"{path}: micrograph name")
        if problem:
            raise CoordinateError(f"{path}: micrograph name {name!r} {problem}; rename it before writing {fmt}")


def _star_columns(with_names: bool, has_score: bool) -> list[str]:
    return ((["rlnMicrographName"] if with_names else []) + ["rlnCoordinateX", "rlnCoordinateY"]
            + (["rlnAutopickFigureOfMerit"] if has_score else []))


def _star_rows(table: pd.DataFrame, with_names: bool, micrograph_ext: str, has_score: bool) -> list[list[str]]:
    """The loop rows of ``table`` as STAR tokens (the columns of :func:`_star_columns`)."""
    from napari_pupick.io.star import format_value

    names = [format_value(_with_extension(n, micrograph_ext)) for n in table["micrograph"]] if with_names else None
    rows = []
    for i, (x, y, s) in enumerate(zip(table["x"], table["y"], table["score"])):
        row = [names[i]] if with_names else []
        row += [f"{x:.6f}", f"{y:.6f}"]
        if has_score:
            row.append(f"{s:.6f}" if np.isfinite(s) else "nan")
        rows.append(row)
    return rows


def format_coordinates(table: pd.DataFrame, fmt: str, *, with_names: bool = True, header: bool = True,
                       has_score: bool | None = None, box_size: float | None = None,
                       micrograph_ext: str = ".mrc") -> str:
    """The text of ``table`` in ``fmt``, as the writers write it (names protected so readers give them back).

    ``with_names=False`` leaves out the STAR name column (a per-micrograph file); ``header=False`` gives the
    rows only (to append to a file streamed in parts); ``has_score`` None: a score column when any score is
    known. The table must be a checked pick table (:func:`as_pick_table`)."""
    if has_score is None:
        has_score = bool(table["score"].notna().any())
    if fmt == "star":
        from napari_pupick.io.star import star_header, write_star_text

        columns, rows = _star_columns(with_names, has_score), _star_rows(table, with_names, micrograph_ext, has_score)
        return write_star_text(columns, rows) if header else write_star_text(columns, rows)[len(star_header(columns)):]
    if fmt in ("csv", "topaz"):
        names = [_protect(n) for n in table["micrograph"]]
        if fmt == "csv":
            df = pd.DataFrame({"micrograph": names, "x": table["x"].to_numpy(), "y": table["y"].to_numpy()})
        else:
            df = pd.DataFrame({"image_name": names, "x_coord": table["x"].to_numpy(),
                               "y_coord": table["y"].to_numpy()})
        if has_score:
            df["score"] = table["score"].to_numpy()
        return df.to_csv(None, sep="," if fmt == "csv" else "\t", index=False, header=header, lineterminator="\n")
    size = float(box_size)  # box
    lines = []
    for x, y, s in zip(table["x"], table["y"], table["score"]):
        fields = [_number(x - size / 2), _number(y - size / 2), _number(size), _number(size)]
        if has_score:
            fields.append(_number(s) if np.isfinite(s) else "nan")
        lines.append("\t".join(fields) + "\n")
    return "".join(lines)


def _writer(table: pd.DataFrame, fmt: str, *, with_names: bool, box_size, micrograph_ext: str):
    """A function writing ``table`` in ``fmt`` to the path it is given."""
    text = format_coordinates(table, fmt, with_names=with_names, box_size=box_size, micrograph_ext=micrograph_ext)

    def write(tmp):
        _write_text(tmp, text)

    return write


def _checked(table, path: Path, fmt: str, box_size, per_micrograph: bool) -> pd.DataFrame:
    """The pick table, checked for writing in ``fmt`` (named CoordinateError otherwise)."""
    table = as_pick_table(table, path)
    if fmt == "box":
        if box_size is None:
            raise CoordinateError(
                f"{path}: EMAN .box files need a box size: pass box_size (pixels, e.g. twice the particle radius)"
            )
        if not np.isfinite(box_size) or box_size <= 0:
            raise CoordinateError(f"{path}: box_size must be a positive number of pixels, got {box_size!r}")
    xy = table[["x", "y"]].to_numpy(float)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(xy).all(axis=1) | (np.abs(xy) > MAX_COORDINATE).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CoordinateError(f"{path}: {int(bad.sum())} pick(s) have coordinates that are not finite numbers within "
                              f"+-{MAX_COORDINATE:g} px (first: row {i + 1}, x={xy[i, 0]!r}, y={xy[i, 1]!r})")
    if np.isinf(table["score"].to_numpy(float)).any():
        raise CoordinateError(f"{path}: the pick table has infinite scores")
    _check_names(table, path, fmt, per_micrograph)
    return table


def write_micrograph_coordinates(table: pd.DataFrame, path, format: str | None = None, *,
                                 box_size: float | None = None) -> Path:
    """Write one micrograph's picks to ``path`` (any name, e.g. RELION's ``<stem>_autopick.star``), atomically.

    The file is what ``write_coordinates(per_micrograph=True)`` writes for one micrograph: STAR without the name
    column (RELION's per-micrograph coordinate files), CSV/Topaz with the name, EMAN box; a table with no picks
    still gives a file (the header alone). ``format`` defaults to the extension of ``path``."""
    path = Path(path)
    fmt = _check_format(format, path) if format else guess_format(path)
    table = _checked(table, path, fmt, box_size, per_micrograph=False)
    if table["micrograph"].nunique() > 1:
        raise CoordinateError(f"{path}: the table holds {table['micrograph'].nunique()} micrographs; this writes one")
    if not path.parent.is_dir():
        raise CoordinateError(f"{path}: the folder {path.parent} does not exist")
    return _atomic_write([(path, _writer(table, fmt, with_names=False, box_size=box_size, micrograph_ext=""))])[0]


def write_coordinates(
    table: pd.DataFrame,
    path,
    format: str | None = None,
    *,
    per_micrograph: bool = False,
    box_size: float | None = None,
    suffix: str = "",
    micrograph_ext: str = ".mrc",
):
    """Write a pick table in one of the coordinate formats, atomically.

    Parameters
    ----------
    table : DataFrame
        Columns ``micrograph, x, y`` and optionally ``score`` (x = column, y = row, original pixels).
    path : str or Path
        The file to write; with ``per_micrograph=True``, the folder to write into (created if needed).
    format : {'star', 'csv', 'topaz', 'box'}, optional
        Default: from the extension of ``path``; 'star' for ``per_micrograph=True``.
    per_micrograph : bool
        Write one file per micrograph into the folder ``path``, named ``<micrograph><suffix><ext>``; such STAR
        files hold only ``rlnCoordinateX``, ``rlnCoordinateY`` (and ``rlnAutopickFigureOfMerit`` when scores
        exist), which is what RELION's coordinate import (ManualPick/AutoPick) expects.
    box_size : float, optional
        Box side in pixels; required for the 'box' format (e.g. twice the particle radius, or the extraction box).
    suffix : str
        Appended to the micrograph name in per-micrograph file names, e.g. ``"_autopick"`` for RELION's naming.
    micrograph_ext : str
        Extension appended to names in the STAR column ``rlnMicrographName`` (RELION stores file names there),
        unless the name already ends in a micrograph extension; ``""`` writes bare names. Reading strips it again.

    Returns
    -------
    Path or list of Path
        The file written, or the files written (one per micrograph, in order of first appearance).

    Raises
    ------
    CoordinateError
        For a table without the needed columns, an unknown format, 'box' without ``box_size``, or a single
        'box' file asked to hold several micrographs (use ``per_micrograph=True``).

    Notes
    -----
    Files are written to temporary files beside their targets and renamed over them only after every file has
    been written; on failure the temporary files are removed and existing files are left as they were. Scores
    are written only when at least one is not NaN (the column is omitted otherwise; single missing scores are
    written as ``nan``); floats are written with 6 decimals in STAR files and at full precision in the other
    formats.
    """
    path = Path(path)
    if format:
        fmt = _check_format(format, path)
    elif per_micrograph:
        if path.suffix.lower() in {e for exts in FORMATS.values() for e in exts}:
            raise CoordinateError(
                f"{path}: per_micrograph=True writes into a folder, not a {path.suffix} file; give a folder path "
                "(and format= for other formats than STAR)"
            )
        fmt = "star"
    else:
        fmt = guess_format(path)
    table = _checked(table, path, fmt, box_size, per_micrograph)
    ext = FORMATS[fmt][0]
    if per_micrograph:
        if path.exists() and not path.is_dir():
            raise CoordinateError(f"{path}: is a file; per_micrograph=True writes into a folder")
        jobs = []
        for name, group in table.groupby("micrograph", sort=False):
            writer = _writer(group, fmt, with_names=False, box_size=box_size, micrograph_ext=micrograph_ext)
            jobs.append((path / f"{name}{suffix}{ext}", writer))
        path.mkdir(parents=True, exist_ok=True)
        return _atomic_write(jobs)
    if fmt == "box" and table["micrograph"].nunique() > 1:
        raise CoordinateError(
            f"{path}: an EMAN .box file holds one micrograph but the table has "
            f"{table['micrograph'].nunique()}; write one file per micrograph (per_micrograph=True)"
        )
    if not path.parent.is_dir():
        raise CoordinateError(f"{path}: the folder {path.parent} does not exist")
    writer = _writer(table, fmt, with_names=True, box_size=box_size, micrograph_ext=micrograph_ext)
    return _atomic_write([(path, writer)])[0]


# ----------------------------------------------------------------------------------------------------------------
# Checks against micrographs
# ----------------------------------------------------------------------------------------------------------------


def _summarise(items, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def validate_in_bounds(table: pd.DataFrame, shapes: dict, path=None) -> None:
    """Check that every point lies on its micrograph.

    Parameters
    ----------
    table : DataFrame
        Pick table (``micrograph, x, y``).
    shapes : dict
        Micrograph name -> (H, W). Micrographs of the table missing from ``shapes`` are not checked (see
        :func:`match_micrographs`).
    path : str or Path, optional
        The coordinate file, named in the error.

    Raises
    ------
    CoordinateError
        If points fall outside their micrograph (beyond the pixel area, ``-0.5 <= x <= W - 0.5`` and the same for
        y): the message says how many, on which micrographs (with their size) and gives an example.
    """
    table = as_pick_table(table, path)
    problems, total = [], 0
    for name, group in table.groupby("micrograph", sort=False):
        if name not in shapes:
            continue
        h, w = shapes[name][-2:]
        x, y = group["x"].to_numpy(), group["y"].to_numpy()
        out = (x < -0.5) | (x > w - 0.5) | (y < -0.5) | (y > h - 0.5)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            total += int(out.sum())
            problems.append(f"{int(out.sum())} on {name} ({h} x {w} pixels, e.g. x={x[i]:g}, y={y[i]:g})")
    if problems:
        raise CoordinateError(
            f"{path or 'pick table'}: {total} point(s) fall outside their micrograph: {_summarise(problems, 4)}. "
            "Are the coordinates for binned micrographs, or x and y swapped?"
        )


def match_micrographs(table: pd.DataFrame, names: Sequence[str], path=None, *, allow_partial: bool = False):
    """Find each point's micrograph among ``names``.

    Parameters
    ----------
    table : DataFrame
        Pick table (``micrograph`` column).
    names : sequence of str
        The micrograph names available (e.g. the planes of a stack, in order).
    path : str or Path, optional
        The coordinate file, named in the error.
    allow_partial : bool
        If True, points of unknown micrographs get index -1 and only a table matching nothing raises.

    Returns
    -------
    ndarray of int, shape (n_points,)
        Index into ``names`` of each point's micrograph (-1 for unmatched points when ``allow_partial``).

    Raises
    ------
    CoordinateError
        If micrograph names of the table match none of ``names`` (or, unless ``allow_partial``, any name does
        not match): the message lists the unmatched names with their point counts and the names that exist.
    """
    index = {str(n): i for i, n in enumerate(names)}
    micrographs = table["micrograph"].astype(str)
    plane = micrographs.map(index).fillna(-1).to_numpy(int)
    unmatched = plane < 0
    if unmatched.any() and (not allow_partial or unmatched.all()):
        counts = micrographs[unmatched].value_counts(sort=False)
        missing = [f"{n} ({c} point{'s' if c > 1 else ''})" for n, c in counts.items()]
        raise CoordinateError(
            f"{path or 'pick table'}: {int(unmatched.sum())} point(s) on micrographs that are not open: "
            f"{_summarise(missing)}; open micrographs: {_summarise(names) or 'none'}"
        )
    return plane
