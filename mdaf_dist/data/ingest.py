"""Streaming, validating ingest of raw UserBehavior CSV (`user,item,category,behavior,ts`).

The byte stream is read in blocks of `block_size_bytes` cut at newlines, so memory beyond the
output arrays stays bounded. Each block is parsed by pyarrow's CSV reader with explicit column
types; value checks (negative ids, unknown behavior, timestamp outside the window) are vectorised
on the parsed columns, so that scattered out-of-window timestamps (the real file has them) do not
send whole blocks down the slow path.
A block that pyarrow cannot parse (wrong field count, a non-integer, a blank line) is
halved at a newline and each half tried again, down to pieces of `_CAREFUL_BYTES`, which the
careful per-row path classifies with the same rules: a few bad lines cost little more than a
fast parse, while a file with bad lines in every piece is parsed row by row, an order of
magnitude slower. Nothing is dropped silently: every rejected line is counted by reason and
written with its 1-based line number and raw text to the rejects file.

Inputs: plain CSV, or compressed with gzip, bzip2, xz or zstd, or a zip holding exactly one CSV
(the official download), told apart by their first bytes, not their names; as a local path or
any fsspec URI (`file://`, `memory://`, `s3://` with s3fs, ...; a URI whose backend is not
installed is one line naming it). A UTF-8 byte-order
mark at the start of the file is stripped and the first row kept if valid. An integer is what
pyarrow accepts: optional `-`, digits, surrounding spaces or tabs, inside int64.

The official file has no header and no quotes; exports from other tools often have both. A first
line of five column names (`user_id,item_id,category_id,behavior_type,timestamp`) is taken as a
header: skipped, returned in the report, and neither a row nor a rejected line. A header-like line
anywhere else is rejected as `header` (two files pasted together, say). Fields may be quoted as
standard CSV has it (RFC 4180: `"1","2","3","pv","1511544070"` is the row `1,2,3,pv,1511544070`,
`""` inside quotes is one quote); a quoted value must still be a valid value. A file whose lines
are separated by tabs, semicolons or pipes is refused naming its separator.

Reading stops as soon as the rejected lines exceed `max_bad_fraction` of the file's estimated
line count (its size over the bytes per line so far, scaled by the compression ratio so far), so a
file of garbage costs a few blocks and a few thousand rejects, not a full pass.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import math
import posixpath
import re
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from mdaf_dist.config import SECONDS_PER_DAY, PrepareConfig
from mdaf_dist.errors import UserError

BEHAVIORS = ("pv", "buy", "cart", "fav")  # behavior code = index
COLUMNS = ("user", "item", "category", "behavior", "ts")
# rejection reasons; a row gets the first that applies, in this order
REJECT_REASONS = (
    "blank_line",
    "header",
    "truncated_last_line",
    "field_count",
    "non_integer_id",
    "negative_id",
    "unknown_behavior",
    "bad_timestamp",
    "ts_outside_window",
)
_REASON_CODE = {reason: code for code, reason in enumerate(REJECT_REASONS)}
_VALID = -1
_BOM = b"\xef\xbb\xbf"
_INTEGER = re.compile(rb"[ \t]*-?[0-9]+[ \t]*")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_BEHAVIOR_CODE = {name.encode(): code for code, name in enumerate(BEHAVIORS)}
_COLUMN_NAME = re.compile(rb"[ \t]*[A-Za-z_][A-Za-z0-9_ ]*")

_READ_OPTIONS = pacsv.ReadOptions(column_names=list(COLUMNS))
# standard CSV quoting and no null values: an empty id, quoted or not, is an error
_PARSE_OPTIONS = pacsv.ParseOptions(quote_char='"', double_quote=True, newlines_in_values=False, ignore_empty_lines=False)
_CONVERT_OPTIONS = pacsv.ConvertOptions(
    column_types={name: pa.string() if name == "behavior" else pa.int64() for name in COLUMNS},
    null_values=[],
    strings_can_be_null=False,
)
_BEHAVIOR_SET = pa.array(BEHAVIORS)
_CAREFUL_BYTES = 64 << 10
# first bytes of the compressed formats read as a stream (zip is an archive: see _open_source)
_ZIP_MAGIC = b"PK\x03\x04"
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_SEPARATORS = {"\t": "tabs", ";": "semicolons", "|": "pipes"}
_DTYPES = (np.int64, np.int64, np.int64, np.int8, np.int64)  # per column of COLUMNS
_END = object()
T = TypeVar("T")


@dataclass
class RawEvents:
    """Valid rows in file order; numpy arrays of equal length."""

    user: np.ndarray  # int64 raw ids
    item: np.ndarray  # int64
    category: np.ndarray  # int64
    behavior: np.ndarray  # int8 code, index into BEHAVIORS
    ts: np.ndarray  # int64 unix seconds

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask: np.ndarray) -> "RawEvents":
        return RawEvents(*(getattr(self, name)[mask] for name in COLUMNS))


@dataclass
class IngestReport:
    source: str
    lines: int  # data lines: every line of the file but a header
    valid: int
    rejected: Dict[str, int]  # reason -> count, reasons in REJECT_REASONS order
    rejects_path: Optional[str]  # None when nothing was rejected
    header: Optional[str] = None  # the skipped header line, if the file has one


@dataclass
class _ParsedBlock:
    """One block's valid rows (columns as in COLUMNS) and the block-local row index of each reject."""

    columns: List[np.ndarray]
    reject_rows: np.ndarray  # int64 row indices within the block
    reject_codes: np.ndarray  # index into REJECT_REASONS


class _Columns:
    """The output columns, preallocated from a running estimate of the final row count and
    regrown to a new estimate when it runs out. The valid rows are held once, in a few large
    allocations: collecting per-block pieces and concatenating them holds them twice, and the
    freed pieces stay in the process as heap fragments."""

    def __init__(self) -> None:
        self.arrays = [np.empty(0, dtype) for dtype in _DTYPES]
        self.size = 0

    def append(self, columns: List[np.ndarray], fraction_read: Optional[float]) -> None:
        """Add a block's rows; `fraction_read` of the input (None if unknown) extrapolates the total."""
        end = self.size + len(columns[0])
        if end > len(self.arrays[0]):
            capacity = max(end, int(end / fraction_read * 1.02)) if fraction_read else 2 * end
            for index, old in enumerate(self.arrays):
                grown = np.empty(capacity, old.dtype)
                grown[: self.size] = old[: self.size]
                self.arrays[index] = grown
        for array, values in zip(self.arrays, columns):
            array[self.size : end] = values
        self.size = end

    def events(self) -> RawEvents:
        """Views of the filled part: no copy, at the price of the estimate's few percent slack."""
        return RawEvents(*(array[: self.size] for array in self.arrays))


class _Rejects:
    """Counts rejected lines and writes them (line,reason,raw) to a CSV created on the first one."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.counts: Counter = Counter()
        self.first: Optional[Tuple[int, str, bytes]] = None
        self._file: Optional[IO[str]] = None
        self._writer = None

    def add(self, line: int, reason: str, raw: bytes) -> None:
        if self._writer is None:
            self._open()
        self.counts[reason] += 1
        if self.first is None:
            self.first = (line, reason, raw)
        self._writer.writerow((line, reason, raw.decode("utf-8", errors="backslashreplace")))

    def _open(self) -> None:
        try:
            fs, path = fsspec.core.url_to_fs(self.path)
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._file = fs.open(path, "w", encoding="utf-8", newline="")
        except OSError as e:
            raise UserError(f"cannot write the rejects file {self.path}: {e}") from None
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(("line", "reason", "raw"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def by_reason(self) -> Dict[str, int]:
        return {reason: self.counts[reason] for reason in REJECT_REASONS if self.counts[reason]}

    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """The first bad line, its reason, the counts by reason and a separator other than the
        comma if the first bad line has one."""
        line, reason, raw = self.first
        text = raw.decode("utf-8", errors="backslashreplace")
        by_reason = ", ".join(f"{name}={count}" for name, count in self.by_reason().items())
        where = f"first bad line {line} ({reason}): {text[:80]!r}; by reason: {by_reason}"
        fields = _fields(raw) or []
        for separator, name in _SEPARATORS.items():
            if len(fields) == 1 and len(raw.split(separator.encode())) == len(COLUMNS):
                return f"{where}; its fields are separated by {name}: the input must be comma-separated"
        return where


class _BadLineLimit:
    """Stops the ingest once the rejected lines exceed `fraction` of the file's estimated line
    count: the lines parsed so far times the CSV bytes in all over those parsed. The CSV's size is
    known for a plain file and a zip member, else estimated from the raw bytes read (gzip, bzip2,
    xz and zstd streams read their input in small steps, so the ratio so far holds). Bad lines
    only grow, so past that point the run could only fail, after writing every reject."""

    def __init__(self, fraction: float, raw_size: Optional[int], csv_size: Optional[int]) -> None:
        self.fraction, self.raw_size, self.csv_size = fraction, raw_size, csv_size

    def estimate(self, lines: int, parsed_bytes: int, read_bytes: int, raw_read: int) -> Optional[int]:
        """Estimated data lines of the whole file; None without a known size."""
        total_bytes = self.csv_size
        if total_bytes is None and self.raw_size and raw_read:
            total_bytes = read_bytes * max(self.raw_size / raw_read, 1.0)
        if total_bytes is None or not parsed_bytes:
            return None
        return math.ceil(lines * total_bytes / parsed_bytes)

    def exceeded(self, bad: int, estimated_lines: Optional[int]) -> bool:
        return estimated_lines is not None and bad > self.fraction * estimated_lines


def ingest(
    source: str, cfg: PrepareConfig, rejects_path: str | Path, progress: bool = True
) -> Tuple[RawEvents, IngestReport]:
    """Read and validate `source`; return its valid rows and a report of what was rejected
    (`IngestStream`, its blocks gathered in memory)."""
    stream = IngestStream(source, cfg, rejects_path, progress)
    columns = _Columns()
    for block, fraction_read in stream:
        columns.append([getattr(block, name) for name in COLUMNS], fraction_read)
    return columns.events(), stream.report


class IngestStream:
    """The valid rows of `source` block by block, as (RawEvents in file order, fraction of the
    input read or None), so a caller that reduces the blocks holds one at a time; `report` is set
    once every block was read.

    Raises UserError for a missing, unreadable or empty input, and when more than
    `cfg.max_bad_fraction` of the lines are rejected (as soon as the estimate shows it).
    """

    def __init__(self, source: str, cfg: PrepareConfig, rejects_path: str | Path, progress: bool = True) -> None:
        self.source, self.cfg, self.rejects_path, self.progress = str(source), cfg, rejects_path, progress
        self.report: Optional[IngestReport] = None

    def __iter__(self) -> Iterator[Tuple[RawEvents, Optional[float]]]:
        source, cfg = self.source, self.cfg
        window_end = cfg.window_start + cfg.window_days * SECONDS_PER_DAY
        window = (cfg.window_start, window_end) if cfg.check_window else None
        rejects = _Rejects(self.rejects_path)
        valid = 0
        lines = 0  # lines of the file read so far, a header included
        header: Optional[bytes] = None
        parsed_bytes = read_bytes = 0  # decompressed bytes parsed and read so far
        with ExitStack() as stack:
            stack.callback(rejects.close)
            raw, stream, size, csv_size = stack.enter_context(_open_source(source))
            limit = _BadLineLimit(cfg.max_bad_fraction, size, csv_size)
            bar = stack.enter_context(
                tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"ingest {Path(source).name}",
                     disable=not self.progress)
            )
            for block, last_without_newline in _blocks(stream, cfg.block_size_bytes):
                bar.update(raw.tell() - bar.n)
                read_bytes += len(block)
                if lines == 0:
                    header, block = _split_header(block)
                    lines = int(header is not None)
                    parsed_bytes = read_bytes - len(block)
                    if not block:
                        continue
                block_lines = block.count(b"\n") + last_without_newline
                for first_line, piece, parsed in _parse(block, block_lines, last_without_newline, window, lines + 1):
                    texts = _line_texts(piece, parsed.reject_rows) if len(parsed.reject_rows) else []
                    for row, code, text in zip(parsed.reject_rows.tolist(), parsed.reject_codes.tolist(), texts):
                        rejects.add(first_line + row, REJECT_REASONS[code], text)
                    valid += len(parsed.columns[0])
                    parsed_bytes += len(piece)
                    parsed_lines = first_line - 1 + len(parsed.columns[0]) + len(parsed.reject_rows) - (header is not None)
                    estimated = limit.estimate(parsed_lines, parsed_bytes, read_bytes, raw.tell())
                    if limit.exceeded(rejects.total(), estimated) and estimated > parsed_lines:
                        raise UserError(
                            f"{source}: {rejects.total()} of the first {parsed_lines} lines are malformed, more than "
                            f"max_bad_fraction={cfg.max_bad_fraction} of the file's estimated {estimated} lines; stopped reading; "
                            f"{rejects.describe()}"
                        )
                    yield RawEvents(*parsed.columns), raw.tell() / size if size else None
                lines += block_lines
        report = IngestReport(
            source=source,
            lines=lines - (header is not None),
            valid=valid,
            rejected=rejects.by_reason(),
            rejects_path=rejects.path if rejects.counts else None,
            header=None if header is None else header.decode("utf-8", errors="backslashreplace"),
        )
        _check_report(report, rejects, cfg)
        self.report = report


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """`items`, the next one read and parsed in a thread while the caller works on this one:
    pyarrow's parser and numpy release the GIL, so a reader of an `IngestStream` that reduces its
    blocks overlaps the two on two cores, for one more block in memory."""
    iterator = iter(items)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(next, iterator, _END)
            while (item := pending.result()) is not _END:
                pending = pool.submit(next, iterator, _END)
                yield item
    finally:
        if hasattr(iterator, "close"):
            iterator.close()  # a generator left early (the caller raised) closes its file now


def _check_report(report: IngestReport, rejects: _Rejects, cfg: PrepareConfig) -> None:
    if report.lines == 0:
        raise UserError(f"{report.source}: " + ("the file is empty" if report.header is None else "the file has a header line and no data"))
    bad = report.lines - report.valid
    where = rejects.describe() if bad else ""
    if report.valid == 0:
        raise UserError(f"{report.source}: no data rows among {report.lines} lines; {where}")
    if bad > cfg.max_bad_fraction * report.lines:
        raise UserError(
            f"{report.source}: {bad} of {report.lines} lines are malformed ({bad / report.lines:.3%}), "
            f"more than max_bad_fraction={cfg.max_bad_fraction}; {where}"
        )


@contextmanager
def _open_source(source: str) -> Iterator[Tuple[IO[bytes], IO[bytes], Optional[int], Optional[int]]]:
    """(raw file, decompressed CSV byte stream, raw size if known, CSV size if known): progress is
    measured on the raw file. I/O and decompression failures, here or while the stream is read,
    become one UserError."""
    try:
        fs, path = fsspec.core.url_to_fs(source)
    except (ValueError, ImportError, OSError) as e:  # an unknown protocol, a backend not installed
        raise UserError(f"cannot read {source}: {str(e).splitlines()[0]}") from None
    try:
        if not fs.isfile(path):
            problem = "is not a file" if fs.exists(path) else "not found"
            raise UserError(f"input {problem}: {source}")
        size = fs.size(path)
        with fs.open(path, "rb") as raw:
            magic = raw.read(6)
            raw.seek(0)
            compression = next((name for prefix, name in _COMPRESSED.items() if magic.startswith(prefix)), None)
            if magic.startswith(_ZIP_MAGIC):
                with zipfile.ZipFile(raw) as archive:
                    member = archive.getinfo(_single_csv_member(archive, source))
                    with archive.open(member) as stream:
                        yield raw, stream, size, member.file_size
            elif compression is None:
                yield raw, raw, size, size
            else:
                with _decompressed(raw, compression) as stream:
                    yield raw, stream, size, None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, lzma.LZMAError, pa.ArrowException) as e:
        raise UserError(f"cannot read {source}: {e}") from None


def _decompressed(raw: IO[bytes], compression: str) -> IO[bytes]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "bzip2":
        return bz2.BZ2File(raw)
    if compression == "xz":
        return lzma.LZMAFile(raw)
    return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")


def _single_csv_member(archive: zipfile.ZipFile, source: str) -> str:
    members = [
        info.filename
        for info in archive.infolist()
        if info.filename.lower().endswith(".csv") and not info.filename.startswith("__MACOSX/")  # macOS metadata
    ]
    if len(members) != 1:
        found = ", ".join(members) if members else "none"
        raise UserError(f"{source}: a zip input must hold exactly one .csv file, found {found}")
    return members[0]


def _blocks(stream: IO[bytes], block_size: int) -> Iterator[Tuple[bytes, bool]]:
    """Blocks of about `block_size` bytes that end at a newline; the flag marks a final block whose
    last line has no newline. A leading UTF-8 byte-order mark is stripped."""
    carry = stream.read(len(_BOM))
    carry = b"" if carry == _BOM else carry
    while chunk := stream.read(block_size):
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            carry += chunk
            continue
        block = b"".join((carry, memoryview(chunk)[:cut]))  # the one copy of the block's bytes
        carry = chunk[cut:]
        yield block, False
    if carry:
        yield carry, not carry.endswith(b"\n")


def _split_header(block: bytes) -> Tuple[Optional[bytes], bytes]:
    """(header line without its line ending, the rest of the block) when the block's first line is
    five column names, else (None, block)."""
    end = block.find(b"\n") + 1 or len(block)
    fields = _fields(block[:end].rstrip(b"\r\n"))
    if fields is not None and len(fields) == len(COLUMNS) and all(_COLUMN_NAME.fullmatch(f) for f in fields):
        return block[:end].rstrip(b"\r\n"), block[end:]
    return None, block


def _parse(
    block: bytes, lines: int, last_without_newline: bool, window: Optional[Tuple[int, int]], first_line: int
) -> Iterator[Tuple[int, bytes, _ParsedBlock]]:
    """(first line number, piece, parsed piece) for consecutive pieces of `block`: the whole block
    when pyarrow parses it, else its halves, recursively, down to pieces the per-row path takes."""
    parsed = _parse_fast(block, lines, window)
    if parsed is not None:
        yield first_line, block, parsed
        return
    middle = block.rfind(b"\n", 0, len(block) // 2) + 1
    if len(block) <= _CAREFUL_BYTES or middle == 0:
        yield first_line, block, _parse_careful(block, last_without_newline, window)
        return
    head, tail = block[:middle], block[middle:]
    head_lines = head.count(b"\n")
    yield from _parse(head, head_lines, False, window, first_line)
    yield from _parse(tail, lines - head_lines, last_without_newline, window, first_line + head_lines)


def _parse_fast(block: bytes, lines: int, window: Optional[Tuple[int, int]]) -> Optional[_ParsedBlock]:
    """pyarrow's parser with vectorised value checks; None when the block needs the careful path."""
    try:
        table = pacsv.read_csv(pa.BufferReader(block), _READ_OPTIONS, _PARSE_OPTIONS, _CONVERT_OPTIONS)
    except pa.ArrowInvalid:
        return None
    if table.num_rows != lines:  # every line must be one row for line numbers to hold (a lone \r splits rows)
        return None
    user, item, category, ts = (table.column(name).to_numpy() for name in ("user", "item", "category", "ts"))
    behavior = pc.fill_null(pc.index_in(table.column("behavior"), value_set=_BEHAVIOR_SET), _VALID)
    behavior = behavior.to_numpy().astype(np.int8)
    del table
    conditions = [(user < 0) | (item < 0) | (category < 0), behavior < 0]
    codes = [_REASON_CODE["negative_id"], _REASON_CODE["unknown_behavior"]]
    if window is not None:
        conditions.append((ts < window[0]) | (ts >= window[1]))
        codes.append(_REASON_CODE["ts_outside_window"])
    reasons = np.select(conditions, codes, default=_VALID)
    valid = reasons == _VALID
    columns = [user, item, category, behavior, ts]
    if valid.all():
        return _ParsedBlock(columns, np.empty(0, np.int64), np.empty(0, np.int8))
    reject_rows = np.flatnonzero(~valid)
    return _ParsedBlock([c[valid] for c in columns], reject_rows, reasons[reject_rows])


def _parse_careful(block: bytes, last_without_newline: bool, window: Optional[Tuple[int, int]]) -> _ParsedBlock:
    """Classify every row of a block in Python: slow, so only for blocks pyarrow rejects."""
    lines = block.split(b"\n")
    if not last_without_newline:
        lines.pop()  # the empty piece after the final newline
    valid_rows: List[Tuple[int, int, int, int, int]] = []
    reject_rows: List[int] = []
    reject_codes: List[int] = []
    for index, line in enumerate(lines):
        is_last = last_without_newline and index == len(lines) - 1
        row, reason = _classify(line.rstrip(b"\r"), is_last, window)
        if reason is None:
            valid_rows.append(row)
        else:
            reject_rows.append(index)
            reject_codes.append(_REASON_CODE[reason])
    values = list(zip(*valid_rows)) if valid_rows else [()] * len(COLUMNS)
    columns = [np.array(column, dtype=dtype) for column, dtype in zip(values, _DTYPES)]
    return _ParsedBlock(columns, np.array(reject_rows, np.int64), np.array(reject_codes, np.int8))


def _classify(
    line: bytes, is_last: bool, window: Optional[Tuple[int, int]]
) -> Tuple[Optional[tuple], Optional[str]]:
    """(parsed row, None) for a valid line, else (None, the first reason in REJECT_REASONS that applies)."""
    if not line.strip():
        return None, "blank_line"
    fields = _fields(line)
    if fields is None:
        return None, "field_count"
    if _integer(fields[0]) is None and fields[0].strip().lower().startswith(b"user"):
        return None, "header"
    if len(fields) != len(COLUMNS):
        return None, "truncated_last_line" if is_last and len(fields) < len(COLUMNS) else "field_count"
    ids = [_integer(field) for field in fields[:3]]
    if None in ids:
        return None, "non_integer_id"
    if min(ids) < 0:
        return None, "negative_id"
    behavior = _BEHAVIOR_CODE.get(fields[3])
    if behavior is None:
        return None, "unknown_behavior"
    ts = _integer(fields[4])
    if ts is None:
        return None, "bad_timestamp"
    if window is not None and not window[0] <= ts < window[1]:
        return None, "ts_outside_window"
    return (ids[0], ids[1], ids[2], behavior, ts), None


def _fields(line: bytes) -> Optional[List[bytes]]:
    """The line's fields under standard CSV quoting, as pyarrow splits them; None when the line
    is not one record (a lone carriage return inside it, which pyarrow takes as a row end).
    Latin-1 maps bytes to characters one to one, so the fields come back byte for byte."""
    try:
        (fields,) = csv.reader([line.decode("latin-1")])
    except csv.Error:
        return None
    return [field.encode("latin-1") for field in fields]


def _integer(field: bytes) -> Optional[int]:
    """The field's int64 value under pyarrow's rules, or None."""
    if not (field.isdigit() or _INTEGER.fullmatch(field)):
        return None
    value = int(field)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _line_texts(block: bytes, rows: np.ndarray) -> List[bytes]:
    """Raw text (without line ending) of the given 0-based lines of a block."""
    newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
    starts = np.concatenate(([0], newlines + 1))
    ends = np.append(newlines, len(block))
    return [block[starts[row] : ends[row]].rstrip(b"\r") for row in rows]
