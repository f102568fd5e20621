"""STAR files as text: a small tokenizer and writer for the subset RELION uses (data blocks, loops, pairs).

Why not ``starfile``'s reader: it reads through :mod:`linecache` (a file fixed after a failed read comes back with
its old lines), keeps only the last of several blocks that share a name, splits ``_key value`` pairs with
:mod:`shlex` (backslashes of Windows paths vanish), rewrites single quotes as double quotes, treats ``#``
anywhere as a comment and fills short loop rows with NaN. Here the file is read once into memory and every value
stays the text it was; the caller converts numbers.

Grammar (STAR 1.1 as RELION writes it): ``data_<name>`` starts a block; ``loop_`` then ``_<tag>`` lines then
rows of values; ``_<tag> <value>`` pairs outside loops. Values are separated by whitespace; a value may be quoted
with ``'`` or ``"`` (the closing quote is the first one followed by whitespace or the end of the line); ``#`` at
the start of an unquoted token starts a comment. Values that would read as something else (empty, starting with
``#``, ``_``, a quote, ``data_``, ``loop_``, ``save_``, ``global_``, ``stop_``, or holding whitespace) are quoted by
:func:`format_value`; values holding a line break, or a quote followed by whitespace of both kinds, cannot be
written and raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from napari_pupick.errors import CoordinateError

__all__ = ["StarBlock", "format_value", "parse_star", "star_header", "tokenize", "write_star_text"]

_RESERVED = ("data_", "loop_", "save_", "global_", "stop_")


@dataclass
class StarBlock:
    """One data block: its name, its loop columns and rows (text values), and its ``_key value`` pairs."""

    name: str
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    pairs: dict = field(default_factory=dict)
    line: int = 0  # line number of ``data_...``


def tokenize(line: str, where: str) -> list[str]:
    """The values of one line (quotes removed, comment dropped). ``where`` names the file and line in errors."""
    out, i, n = [], 0, len(line)
    while i < n:
        c = line[i]
        if c.isspace():
            i += 1
            continue
        if c == "#":
            break
        if c in "'\"":
            j = i + 1
            while True:
                j = line.find(c, j)
                if j < 0:
                    raise CoordinateError(f"{where}: unterminated quoted value {line[i:].strip()!r}")
                if j + 1 == n or line[j + 1].isspace():
                    break
                j += 1
            out.append(line[i + 1 : j])
            i = j + 1
            continue
        j = i
        while j < n and not line[j].isspace():
            j += 1
        out.append(line[i:j])
        i = j
    return out


def parse_star(text: str, path) -> list[StarBlock]:
    """Every data block of ``text`` in file order (blocks sharing a name are all kept).

    Raises CoordinateError naming ``path`` and the line for a loop row with the wrong number of values, a
    duplicate column, a pair without a value or an unterminated quote.
    """
    blocks: list[StarBlock] = []
    block: StarBlock | None = None
    in_loop = reading_header = False
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}, line {number}"
        low = stripped.lower()
        if low.startswith("data_"):
            block = StarBlock(stripped.split()[0][5:], line=number)
            blocks.append(block)
            in_loop = reading_header = False
            continue
        if block is None:
            continue  # text before the first block (RELION writes a comment line)
        if low.startswith("loop_"):
            if block.columns:
                raise CoordinateError(f"{where}: a second loop in block data_{block.name}; one loop per block")
            in_loop = reading_header = True
            continue
        if stripped.startswith("_"):
            tokens = tokenize(stripped, where)
            tag = tokens[0][1:]
            if in_loop and reading_header:
                if tag in block.columns:
                    raise CoordinateError(f"{where}: column _{tag} appears twice in block data_{block.name}")
                block.columns.append(tag)
                continue
            in_loop = False
            if len(tokens) != 2:
                raise CoordinateError(f"{where}: expected '_{tag} value', found {stripped!r}")
            block.pairs[tag] = tokens[1]
            continue
        if in_loop:
            reading_header = False
            values = tokenize(stripped, where)
            if len(values) != len(block.columns):
                raise CoordinateError(
                    f"{where}: {len(values)} value(s) in a row of block data_{block.name}, which has "
                    f"{len(block.columns)} column(s): {stripped!r}"
                )
            block.rows.append(values)
            continue
        raise CoordinateError(f"{where}: unexpected text outside a loop: {stripped!r}")
    return blocks


def format_value(value: str, what: str = "value") -> str:
    """``value`` as one STAR token, quoted when it would otherwise read back differently.

    Raises CoordinateError (naming ``what``) for text no STAR token can hold (line breaks, or both ``' `` and
    ``" `` inside).
    """
    text = str(value)
    if "\n" in text or "\r" in text:
        raise CoordinateError(f"{what} {text!r} holds a line break: a STAR file cannot store it")
    needs = (not text or any(ch.isspace() for ch in text) or text[0] in "#_'\""
             or text.lower().startswith(_RESERVED))
    if not needs:
        return text
    for q in ("'", '"'):
        # inside a q-quoted value, q followed by whitespace (or at the very end) would close it early
        if not any(text[i] == q and (i + 1 == len(text) or text[i + 1].isspace()) for i in range(len(text))):
            return f"{q}{text}{q}"
    raise CoordinateError(f"{what} {text!r} holds both kinds of quote before whitespace: a STAR file cannot store it")


def star_header(columns: list[str], block: str = "") -> str:
    """The start of a STAR file with one loop block of ``columns`` (tag names without ``_``); rows follow, one
    line each of tab-separated formatted tokens."""
    lines = ["# written by napari-pupick", "", f"data_{block}", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(columns, 1)]
    return "\n".join(lines) + "\n"


def write_star_text(columns: list[str], rows, block: str = "") -> str:
    """A STAR file with one loop block: ``columns`` (tag names without ``_``) and ``rows`` of formatted tokens."""
    return star_header(columns, block) + "".join("\t".join(r) + "\n" for r in rows)
