"""Reading prompt/response(/history) examples from JSON-lines or JSON-list files.

Every problem with the input is reported as a :class:`DataError` whose message names the file, the 1-based
line (or list item) and the key involved, and says how to fix it.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DataError", "Example", "ReadResult", "read_examples"]


@dataclass(frozen=True)
class Example:
    """One training/evaluation example: the current prompt, its target response and earlier turns."""

    prompt: str
    response: str
    history: tuple[tuple[str, str], ...] = ()


class DataError(ValueError):
    """Bad input data; the message names the file, line and key and says how to fix it."""


@dataclass(frozen=True)
class ReadResult:
    """The usable examples of a file, and how many rows were skipped for an empty prompt/response."""

    examples: list[Example]
    skipped_empty: int  # rows skipped because prompt or response was empty/whitespace


MAX_REPORTED = 20  # bad rows listed in one error
SKIPPED_SHOWN = 5  # line numbers of skipped empty rows named in the warning

_COLUMN_KEYS = {
    "prompt": "dataset.prompt_column",
    "response": "dataset.response_column",
    "history": "dataset.history_column",
}


def read_examples(
    path: str | os.PathLike,
    *,
    prompt_column: str,
    response_column: str,
    history_column: str | None = None,
    encoding: str = "utf-8",
) -> ReadResult:
    """Read examples from ``path``.

    The file is either JSON lines (one object per line, blank lines ignored) or a single JSON list of objects
    (detected by a leading ``[``). Rows whose prompt or response is empty or whitespace-only are skipped,
    counted in :attr:`ReadResult.skipped_empty` and logged as a warning naming the first few lines. A null history
    counts as no history. Every bad row is reported in one error (the first ``MAX_REPORTED`` listed).

    Raises:
        DataError: missing/unreadable file, bad encoding, invalid JSON, missing column, wrong value type,
            or no usable rows.
    """
    text = _read_text(path, encoding)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty. Expected JSON lines (one JSON object per line).")

    columns = (prompt_column, response_column, history_column)
    examples: list[Example] = []
    skipped: list[str] = []  # where each skipped row is
    problems: list[str] = []  # one message per bad row, all reported together
    n_rows = 0
    rows = _iter_list_items(path, text) if stripped[0] == "[" else _iter_lines(path, text)
    try:
        for where, row in rows:
            n_rows += 1
            try:
                example = _to_example(path, where, row, columns)
            except DataError as err:
                problems.append(str(err))
                continue
            if example is None:
                skipped.append(where)
            else:
                examples.append(example)
    except DataError as err:  # a JSON list that cannot be parsed on: report it with the rows before it
        problems.append(str(err))
    if problems:
        raise DataError(_all_problems(path, problems))

    if skipped:
        shown = ", ".join(skipped[:SKIPPED_SHOWN]) + (", ..." if len(skipped) > SKIPPED_SHOWN else "")
        logger.warning(
            "%s: skipped %d of %d rows whose '%s' or '%s' is empty or whitespace-only (line %s).",
            path,
            len(skipped),
            n_rows,
            prompt_column,
            response_column,
            shown,
        )
    if not examples:
        if n_rows == 0:
            raise DataError(f"{path}: the file holds no rows (an empty JSON list). Add at least one object.")
        raise DataError(
            f"{path}: no usable rows: all {n_rows} rows have an empty '{prompt_column}' or "
            f"'{response_column}'. Check that dataset.prompt_column / dataset.response_column name the right "
            f"keys."
        )
    return ReadResult(examples=examples, skipped_empty=len(skipped))


def _all_problems(path: str | os.PathLike, problems: list[str]) -> str:
    """One message for every bad row (the first ``MAX_REPORTED`` listed), so that one pass fixes them all."""
    if len(problems) == 1:
        return problems[0]
    more = f", the first {MAX_REPORTED} below" if len(problems) > MAX_REPORTED else ""
    listed = "\n".join(f"  {message}" for message in problems[:MAX_REPORTED])
    return f"{path}: {len(problems)} bad rows{more}; fix them all and run again:\n{listed}"


# ---------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------


def split_path(dataset_dir: str | os.PathLike, file_name: str) -> Path:
    """A split's file: ``dataset.dir`` (``~`` expanded) joined with ``dataset.train_file`` or
    ``dataset.validation_file``; the trainer, the evaluator and train.py's pre-check all find it so."""
    return Path(dataset_dir).expanduser() / file_name


def file_problem(path: str | os.PathLike) -> DataError | None:
    """What is wrong with a split's path before it is read (None: it is a file); train.py checks both splits
    with it before torch loads, so a wrong ``dataset.dir`` is refused at once."""
    p = Path(path)
    if p.is_dir():
        return DataError(
            f"{path}: is a directory, not a file. dataset.dir should be the directory and "
            f"dataset.train_file / dataset.validation_file the file names inside it."
        )
    if not p.is_file():
        return DataError(
            f"{path}: file not found. Check dataset.dir (the data directory) and the file names "
            f"dataset.train_file / dataset.validation_file."
        )
    return None


def _read_text(path: str | os.PathLike, encoding: str) -> str:
    if (problem := file_problem(path)) is not None:
        raise problem
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}).") from None
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise DataError(
            f"{path}: unknown encoding {encoding!r}. Set dataset.encoding to a Python codec name, e.g. utf-8 or gbk."
        ) from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: the file is not valid {encoding} (dataset.encoding={encoding}; byte offset {e.start}: "
            f"{e.reason}). {_encoding_hint(raw, encoding, p)} dataset.encoding applies to the train and the "
            f"validation file alike: files in different encodings need one of them converted."
        ) from None
    return text[1:] if text.startswith("\ufeff") else text  # drop a byte-order mark


# Encodings that AdvertiseGen-style files come in, tried in this order when the configured one fails (gbk before
# its superset gb18030, so the common name is suggested when it is enough).
LIKELY_ENCODINGS = ("utf-8", "gbk", "gb18030")


def _encoding_hint(raw: bytes, used: str, path: Path) -> str:
    """What to do about a file that is not valid ``used``: the first likely encoding that decodes it whole, or how
    to find out."""
    for candidate in LIKELY_ENCODINGS:
        if codecs.lookup(candidate).name == codecs.lookup(used).name:
            continue
        try:
            raw.decode(candidate)
        except UnicodeDecodeError:
            continue
        return (
            f"It decodes as {candidate}: set dataset.encoding={candidate}, or convert it, e.g. "
            f"`iconv -f {candidate} -t {used} {path.name} > {path.stem}.{used}{path.suffix}`."
        )
    return (
        f"It is not {' or '.join(c for c in LIKELY_ENCODINGS if codecs.lookup(c).name != codecs.lookup(used).name)} "
        f"either: find its encoding (e.g. `file -i {path.name}`) and set dataset.encoding to it."
    )


def _iter_lines(path: str | os.PathLike, text: str):
    """Yield (``"N"``, parsed object) for each non-blank line of a JSON-lines text; a line that is not JSON yields its
    :class:`DataError` in place of the object, so that it is reported with the other bad rows."""
    loads = json.loads
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line or line.isspace():
            continue
        try:
            row = loads(line)
        except json.JSONDecodeError as e:
            row = DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}). Each line must be one JSON "
                f'object, e.g. {{"prompt": "...", "response": "..."}}.'
            )
        yield f"{lineno}", row


def _iter_list_items(path: str | os.PathLike, text: str):
    """Yield (``"line L (item N)"``, object) for each item of a text holding one JSON list."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    pos = text.index("[") + 1
    lineno, counted = 1, 0
    item = 0
    end = len(text)

    def skip_ws(i: int) -> int:
        while i < end and text[i] in ws:
            i += 1
        return i

    def bad(i: int, msg: str) -> DataError:
        line = text.count("\n", 0, i) + 1
        return DataError(
            f"{path}:{line}: not valid JSON ({msg}). The file starts with '[', so it must hold "
            f'one JSON list of objects, e.g. [{{"prompt": "...", "response": "..."}}].'
        )

    pos = skip_ws(pos)
    if pos < end and text[pos] == "]":
        pos += 1
    else:
        while True:
            if pos >= end:
                raise bad(pos, "the list is not closed with ']'")
            try:
                row, next_pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise bad(e.pos, f"{e.msg} at line {e.lineno} column {e.colno}") from None
            item += 1
            lineno += text.count("\n", counted, pos)
            counted = pos
            yield f"{lineno} (item {item})", row
            pos = skip_ws(next_pos)
            if pos < end and text[pos] == ",":
                pos = skip_ws(pos + 1)
            elif pos < end and text[pos] == "]":
                pos += 1
                break
            else:
                raise bad(pos, "expected ',' or ']' after a list item")
    pos = skip_ws(pos)
    if pos < end:
        raise bad(pos, "extra data after the closing ']'")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _to_example(path: str | os.PathLike, where: str, row: Any, columns: tuple[str, str, str | None]) -> Example | None:
    """Validate one parsed row; ``None`` when its prompt or response is empty."""
    if isinstance(row, DataError):  # the line was not JSON
        raise row
    if not isinstance(row, dict):
        raise DataError(
            f'{path}:{where}: expected a JSON object like {{"prompt": "...", "response": "..."}}, '
            f"got a {_type_name(row)}."
        )
    prompt_column, response_column, history_column = columns
    prompt = _get(path, where, row, prompt_column, "prompt")
    response = _get(path, where, row, response_column, "response")
    for value, column, role in ((prompt, prompt_column, "prompt"), (response, response_column, "response")):
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{where}: '{column}' (the {role} column) must be a string, got a {_type_name(value)}."
            )

    history: tuple[tuple[str, str], ...] = ()
    if history_column is not None:
        raw = _get(path, where, row, history_column, "history")
        if raw is not None:
            history = _parse_history(path, where, history_column, raw)

    if not prompt.strip() or not response.strip():
        return None
    return Example(prompt=prompt, response=response, history=history)


def _get(path: str | os.PathLike, where: str, row: dict, column: str, role: str) -> Any:
    try:
        return row[column]
    except KeyError:
        keys = ", ".join(repr(k) for k in row) or "none"
        raise DataError(
            f"{path}:{where}: missing key '{column}' (the {role} column); this row has keys: {keys}. "
            f"Set {_COLUMN_KEYS[role]}=<key> to the name your data uses."
        ) from None


def _parse_history(path: str | os.PathLike, where: str, column: str, raw: Any) -> tuple[tuple[str, str], ...]:
    hint = 'a list of [query, answer] string pairs, e.g. [["q1", "a1"], ["q2", "a2"]]'
    if not isinstance(raw, list):
        raise DataError(f"{path}:{where}: '{column}' (the history column) must be {hint}; got a {_type_name(raw)}.")
    turns = []
    for i, turn in enumerate(raw):
        if (
            not isinstance(turn, (list, tuple))
            or len(turn) != 2
            or not isinstance(turn[0], str)
            or not isinstance(turn[1], str)
        ):
            shown = json.dumps(turn, ensure_ascii=False)[:80]
            raise DataError(
                f"{path}:{where}: '{column}' (the history column) entry {i} is {shown}; the history must be {hint}."
            )
        turns.append((turn[0], turn[1]))
    return tuple(turns)
