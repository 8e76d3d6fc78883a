"""Ingest of raw UserBehavior CSV: every malformed line is classified, counted and written out with
its line number; a header is skipped and quoted fields read as CSV reads them; compressed, archived
and remote inputs and block boundaries do not change results."""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import uuid
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from mdaf_dist.cli import main
from mdaf_dist.config import SECONDS_PER_DAY, TAOBAO_START_TS, PrepareConfig
from mdaf_dist.data.ingest import BEHAVIORS, RawEvents, ingest, prefetched
from mdaf_dist.data.layout import read_meta, sample_files
from mdaf_dist.data.synth import generate
from mdaf_dist.errors import UserError

T0 = TAOBAO_START_TS
SLICE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taobao_userbehavior_1h_slice.csv"
BLOCK_SIZES = (64 << 20, 16, 1)  # one block; blocks shorter than a line; one byte at a time
HEADER = "user_id,item_id,category_id,behavior_type,timestamp"


def good_rows(n: int = 8) -> list[str]:
    return [f"{u},{100 + u},{1000 + u % 3},{BEHAVIORS[u % 4]},{T0 + 7 * u}" for u in range(1, n + 1)]


def reference(rows: list[str]) -> RawEvents:
    """The valid rows parsed by hand, the reference for ingest's output."""
    fields = [row.split(",") for row in rows]
    ints = lambda k: np.array([int(f[k]) for f in fields], np.int64)  # noqa: E731
    behavior = np.array([BEHAVIORS.index(f[3]) for f in fields], np.int8)
    return RawEvents(ints(0), ints(1), ints(2), behavior, ints(4))


def assert_events_equal(actual: RawEvents, expected: RawEvents) -> None:
    for name in ("user", "item", "category", "behavior", "ts"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype, name
        np.testing.assert_array_equal(a, e, err_msg=name)


def read_rejects(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def config(block_size: int = 64 << 20, **overrides) -> PrepareConfig:
    return PrepareConfig(**{"max_bad_fraction": 0.5, "block_size_bytes": block_size, **overrides})


def quoted(row: str) -> str:
    """The row with every field in double quotes, as spreadsheet exports write it."""
    return ",".join(f'"{field}"' for field in row.split(","))


def write(tmp_path: Path, text: str | bytes, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


BAD_LINES = [
    ("1,2,3,pv", "field_count"),
    (f"1,2,3,pv,{T0},7", "field_count"),
    (f"1,2,3,pv,{T0}\r5,6,7,pv,{T0}", "field_count"),  # pyarrow would take a lone \r as a row end
    (f"u1,2,3,pv,{T0}", "non_integer_id"),
    (f"1,,3,pv,{T0}", "non_integer_id"),
    (f"1,2,3.5,pv,{T0}", "non_integer_id"),
    (f"1,99999999999999999999,3,pv,{T0}", "non_integer_id"),
    (f"-1,2,3,pv,{T0}", "negative_id"),
    (f"1,2,-3,pv,{T0}", "negative_id"),
    (f"1,2,3,click,{T0}", "unknown_behavior"),
    (f"1,2,3,PV,{T0}", "unknown_behavior"),
    ("1,2,3,pv,2017-11-25", "bad_timestamp"),
    ("1,2,3,pv,", "bad_timestamp"),
    ("1,2,3,pv,15", "ts_outside_window"),
    (f"1,2,3,pv,{T0 - 1}", "ts_outside_window"),
    (f"1,2,3,pv,{T0 + 9 * SECONDS_PER_DAY}", "ts_outside_window"),  # the window's end is exclusive
    (HEADER, "header"),  # a header anywhere but the first line is a bad line
    ("", "blank_line"),
    ("  ", "blank_line"),
    # quoted fields are unquoted first; what is inside must be valid
    (quoted("1,2,3,pv,15"), "ts_outside_window"),
    (quoted(f"1,2,3,click,{T0}"), "unknown_behavior"),
    (f'1,"",3,pv,{T0}', "non_integer_id"),
    (f'1,"2"x,3,pv,{T0}', "non_integer_id"),
    (f'1,"2""",3,pv,{T0}', "non_integer_id"),  # "" inside quotes is a quote character
    (f'1,2,3,"pv,{T0}"', "field_count"),  # a quoted comma does not separate fields
    (f'"1,2,3,pv,{T0}', "field_count"),  # an unclosed quote runs to the end of the line
]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_each_bad_line_is_counted_and_written_with_its_line_number(tmp_path, bad, reason, block_size):
    rows = good_rows()
    path = write(tmp_path, "\n".join(rows[:3] + [bad] + rows[3:]) + "\n")
    rejects = tmp_path / "out" / "rejects.csv"
    events, report = ingest(str(path), config(block_size), rejects, progress=False)
    assert_events_equal(events, reference(rows))
    assert (report.lines, report.valid, report.rejected) == (9, 8, {reason: 1})
    assert report.rejects_path == str(rejects)
    assert read_rejects(report.rejects_path) == [["line", "reason", "raw"], ["4", reason, bad]]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(
    "last, reason",
    [("1,2,3", "truncated_last_line"), (f"1,2,3,pv,{T0},9", "field_count"), (f"1,2,3,pv,{T0}", None)],
)
def test_last_line_without_newline(tmp_path, last, reason, block_size):
    rows = good_rows()
    path = write(tmp_path, "\n".join(rows + [last]))
    events, report = ingest(str(path), config(block_size), tmp_path / "rejects.csv", progress=False)
    assert report.lines == 9
    if reason is None:
        assert_events_equal(events, reference(rows + [last]))
        assert (report.rejected, report.rejects_path) == ({}, None)
        assert not (tmp_path / "rejects.csv").exists()
    else:
        assert_events_equal(events, reference(rows))
        assert report.rejected == {reason: 1}
        assert read_rejects(report.rejects_path)[1:] == [["9", reason, last]]


def test_the_exact_rejects_file(tmp_path):
    rows = good_rows()
    bad = [HEADER, '1,"2",3,pv,15', ""]
    path = write(tmp_path, "\n".join(rows[:1] + bad[:1] + rows[1:4] + bad[1:] + rows[4:]) + "\n")
    _, report = ingest(str(path), config(), tmp_path / "rejects.csv", progress=False)
    assert report.rejected == {"blank_line": 1, "header": 1, "ts_outside_window": 1}
    assert Path(report.rejects_path).read_text() == (
        "line,reason,raw\n"
        '2,header,"user_id,item_id,category_id,behavior_type,timestamp"\n'
        '6,ts_outside_window,"1,""2"",3,pv,15"\n'
        "7,blank_line,\n"
    )


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("header", [HEADER, quoted(HEADER), "User ID,Item ID,Category ID,Behavior,Timestamp"])
def test_a_first_line_of_column_names_is_skipped_as_a_header(tmp_path, header, newline, block_size):
    """Under the default max_bad_fraction: one header in a small file is no bad line."""
    rows = good_rows()
    path = write(tmp_path, b"\xef\xbb\xbf" + newline.join([header] + rows).encode())
    rejects = tmp_path / "rejects.csv"
    events, report = ingest(str(path), PrepareConfig(block_size_bytes=block_size), rejects, progress=False)
    assert_events_equal(events, reference(rows))
    assert (report.header, report.lines, report.valid, report.rejected, report.rejects_path) == (header, 8, 8, {}, None)
    assert not rejects.exists()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_a_header_needs_five_names_on_the_first_line(tmp_path, block_size):
    rows = good_rows()
    not_headers = {
        "user_id,item_id,category_id,behavior_type": "header",  # four names
        f"user_id,item_id,category_id,behavior_type,{T0}": "header",  # a number is no column name
    }
    for first, reason in not_headers.items():
        path = write(tmp_path, "\n".join([first] + rows) + "\n")
        events, report = ingest(str(path), config(block_size), tmp_path / "rejects.csv", progress=False)
        assert_events_equal(events, reference(rows))
        assert (report.header, report.lines, report.rejected) == (None, 9, {reason: 1})
        assert read_rejects(report.rejects_path)[1:] == [["1", reason, first]]
    only_header = write(tmp_path, HEADER + "\n", "header_only.csv")
    with pytest.raises(UserError) as error:
        ingest(str(only_header), config(block_size), tmp_path / "rejects.csv", progress=False)
    assert str(error.value) == f"{only_header}: the file has a header line and no data"


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_quoted_fields_parse_as_the_unquoted_row(tmp_path, block_size):
    rows = good_rows(12)
    partly = [f'{u},"{i}",{c},"{b}",{t}' for u, i, c, b, t in (row.split(",") for row in rows[8:])]
    lines = [quoted(row) for row in rows[:8]] + partly + ["1,2"]  # a bad line sends the block down the per-row path too
    path = write(tmp_path, "\n".join(lines) + "\n")
    events, report = ingest(str(path), config(block_size), tmp_path / "rejects.csv", progress=False)
    assert_events_equal(events, reference(rows))
    assert (report.lines, report.rejected) == (13, {"field_count": 1})


def test_prepare_of_a_headed_quoted_file_equals_prepare_of_the_plain_file(tmp_path, capsys):
    """The whole chain: same stage counts and samples; the header is printed once and kept in meta."""
    plain = tmp_path / "plain.csv"
    generate(str(plain), 3000, seed=5, progress=False)
    headed = write(tmp_path, "\n".join([HEADER] + [quoted(row) for row in plain.read_text().splitlines()]) + "\n", "headed.csv")
    metas, samples = [], []
    for source in (plain, headed):
        out = tmp_path / source.stem
        assert main(["prepare", "--input", str(source), "--out", str(out), "--quiet"]) == 0
        metas.append(read_meta(out))
        samples.append([f.read_bytes() for split in ("train", "valid") for f in sample_files(out, split)])
    printed = capsys.readouterr().out
    assert printed.count("skipped the header line") == 1
    assert f"skipped the header line: {HEADER}\n" in printed
    assert (metas[0]["ingest"]["header"], metas[1]["ingest"]["header"]) == (None, HEADER)
    assert metas[1]["ingest"]["rejected"] == {} and metas[1]["stages"] == metas[0]["stages"]
    assert samples[1] == samples[0] and samples[0]


def test_mixed_file_is_the_same_for_every_block_size_and_line_ending(tmp_path):
    """A field-count error in the first block sends it through the per-row path; with tiny blocks
    the same value errors go through pyarrow and the vectorised checks: both must agree."""
    rows = good_rows(42)
    padded = f" 7 ,8,9,cart,{T0}"  # padded integers are integers, as pyarrow reads them
    in_quotes = f'"8"," 9 ",7,"buy",{T0}'
    bad = [f"-5,2,3,pv,{T0}", f"5,2,3,fav2,{T0}", "5,2,3,pv,15", padded, "1,2", "", in_quotes, quoted("5,2,3,pv,15")]
    pairs = list(zip(rows, bad * 6))
    lines = [HEADER] + [line for pair in pairs for line in pair]
    valid_bad = {padded: f"7,8,9,cart,{T0}", in_quotes: f"8,9,7,buy,{T0}"}
    expected_valid = [valid_bad.get(line, line) for pair in pairs for line in pair if line in (pair[0], *valid_bad)]
    results = []
    for newline in ("\n", "\r\n"):
        path = write(tmp_path, newline.join(lines) + newline, f"in{len(newline)}.csv")
        for block_size in BLOCK_SIZES:
            rejects = tmp_path / f"rejects-{len(newline)}-{block_size}.csv"
            events, report = ingest(str(path), config(block_size), rejects, progress=False)
            assert (report.header, report.lines, report.valid) == (HEADER, len(lines) - 1, len(expected_valid))
            results.append((events, report.rejected, read_rejects(str(rejects))))
    events, rejected, rejected_rows = results[0]
    assert_events_equal(events, reference(expected_valid))
    assert rejected == {
        "blank_line": 5, "field_count": 5, "negative_id": 6, "unknown_behavior": 6, "ts_outside_window": 10,
    }
    assert rejected_rows[1:4] == [["3", "negative_id", bad[0]], ["5", "unknown_behavior", bad[1]], ["7", "ts_outside_window", bad[2]]]
    assert ["17", "ts_outside_window", bad[7]] in rejected_rows
    for other_events, other_rejected, other_rows in results[1:]:
        assert_events_equal(other_events, events)
        assert (other_rejected, other_rows) == (rejected, rejected_rows)


def test_bad_lines_deep_inside_a_large_block_keep_their_line_numbers(tmp_path):
    """A large block pyarrow rejects is halved until the pieces holding the bad lines are small."""
    rows = good_rows(6000)
    bad = {2: HEADER, 3001: "1,2", 4500: "", 4501: "x,1,2,pv,3"}
    reasons = {2: "header", 3001: "field_count", 4500: "blank_line", 4501: "non_integer_id"}
    lines = list(rows)
    for number, text in sorted(bad.items()):
        lines.insert(number - 1, text)
    path = write(tmp_path, "\n".join(lines + ["1,2,3"]))
    expected_rejects = (
        [["line", "reason", "raw"]]
        + [[str(number), reason, bad[number]] for number, reason in reasons.items()]
        + [[str(len(lines) + 1), "truncated_last_line", "1,2,3"]]
    )
    for block_size in (64 << 20, 50_000):
        events, report = ingest(str(path), config(block_size), tmp_path / "rejects.csv", progress=False)
        assert_events_equal(events, reference(rows))
        assert read_rejects(report.rejects_path) == expected_rejects


def test_window_check_can_be_switched_off(tmp_path):
    rows = good_rows() + ["1,2,3,pv,15"]
    path = write(tmp_path, "\n".join(rows) + "\n")
    events, report = ingest(str(path), config(check_window=False), tmp_path / "rejects.csv", progress=False)
    assert_events_equal(events, reference(rows))
    assert report.rejected == {}


def test_byte_order_mark_is_stripped_and_the_first_row_kept(tmp_path):
    rows = good_rows()
    path = write(tmp_path, b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())
    events, report = ingest(str(path), config(block_size=1), tmp_path / "rejects.csv", progress=False)
    assert_events_equal(events, reference(rows))
    assert (report.lines, report.rejected, report.rejects_path) == (8, {}, None)


def test_too_many_bad_lines_is_an_error_naming_everything(tmp_path):
    rows = good_rows()
    lines = rows[:2] + [f"-1,2,3,pv,{T0}"] + rows[2:7] + ["1,2,3", rows[7]]
    path = write(tmp_path, "\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.csv"
    with pytest.raises(UserError) as error:
        ingest(str(path), PrepareConfig(max_bad_fraction=0.1), rejects, progress=False)
    assert str(error.value) == (
        f"{path}: 2 of 10 lines are malformed (20.000%), more than max_bad_fraction=0.1; "
        f"first bad line 3 (negative_id): '-1,2,3,pv,{T0}'; by reason: field_count=1, negative_id=1"
    )
    assert len(read_rejects(str(rejects))) == 3
    # exactly at the threshold is still accepted
    _, report = ingest(str(path), PrepareConfig(max_bad_fraction=0.2), rejects, progress=False)
    assert report.valid == 8


@pytest.mark.parametrize("separator, name", [("\t", "tabs"), (";", "semicolons"), ("|", "pipes")])
def test_another_separator_is_named(tmp_path, separator, name):
    path = write(tmp_path, "".join(row.replace(",", separator) + "\n" for row in good_rows()))
    with pytest.raises(UserError, match=f"no data rows among 8 lines; .*; its fields are separated by {name}: the input must be comma-separated$"):
        ingest(str(path), config(), tmp_path / "rejects.csv", progress=False)


@pytest.mark.parametrize("compress", [lambda text: text, gzip.compress], ids=["plain", "gzip"])
def test_a_garbage_file_stops_early_with_few_rejects(tmp_path, compress):
    # every other line bad, 200,000 lines: the limit (0.1 %) is crossed after about 200 bad lines
    rows = good_rows(100_000)
    text = "".join(f"{row}\nnot a row\n" for row in rows).encode()
    path = write(tmp_path, compress(text), "garbage.csv")
    rejects = tmp_path / "rejects.csv"
    with pytest.raises(UserError, match=r"^\S+: \d+ of the first \d+ lines are malformed, more than max_bad_fraction=0.001 of the file's estimated \d+ lines; stopped reading;"):
        ingest(str(path), config(block_size=1 << 20, max_bad_fraction=0.001), rejects, progress=False)
    written = len(read_rejects(str(rejects)))
    assert 200 < written < 5_000


def test_missing_empty_and_unreadable_inputs_are_one_line_errors(tmp_path):
    rejects = tmp_path / "rejects.csv"
    cases = {
        str(tmp_path / "nope.csv"): f"input not found: {tmp_path / 'nope.csv'}",
        str(write(tmp_path, "", "empty.csv")): f"{tmp_path / 'empty.csv'}: the file is empty",
        str(write(tmp_path, b"\xef\xbb\xbf", "bom.csv")): f"{tmp_path / 'bom.csv'}: the file is empty",
        str(tmp_path): f"input is not a file: {tmp_path}",
        str(write(tmp_path, "header\n", "header.csv")): (
            f"{tmp_path / 'header.csv'}: no data rows among 1 lines; first bad line 1 (field_count): 'header'; "
            f"by reason: field_count=1"
        ),
    }
    for source, message in cases.items():
        with pytest.raises(UserError) as error:
            ingest(source, PrepareConfig(max_bad_fraction=1.0), rejects, progress=False)
        assert str(error.value) == message
    # told apart by their first bytes: the names do not matter
    unreadable = {
        "cut.csv": gzip.compress(b"1,2,3,pv,5\n" * 100)[:40],
        "bad.zip": b"PK\x03\x04 not a zip",
        "cut.bz2": bz2.compress(b"1,2,3,pv,5\n" * 100)[:40],
        "cut.xz": lzma.compress(b"1,2,3,pv,5\n" * 100)[:40],
        "bad.zst": b"\x28\xb5\x2f\xfd not zstd",
    }
    sources = [str(write(tmp_path, data, name)) for name, data in unreadable.items()] + ["nosuchprotocol://in.csv"]
    for source in sources:
        with pytest.raises(UserError, match=f"^cannot read {source}: "):
            ingest(source, PrepareConfig(), rejects, progress=False)


@pytest.mark.parametrize("members, found", [([], "none"), (["a.csv", "b/c.CSV"], "a.csv, b/c.CSV")])
def test_zip_must_hold_exactly_one_csv(tmp_path, members, found):
    path = tmp_path / "in.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", "not data")
        archive.writestr("__MACOSX/._a.csv", "resource fork")
        for member in members:
            archive.writestr(member, "1,2,3,pv,5\n")
    with pytest.raises(UserError) as error:
        ingest(str(path), PrepareConfig(), tmp_path / "rejects.csv", progress=False)
    assert str(error.value) == f"{path}: a zip input must hold exactly one .csv file, found {found}"


def test_compressed_archived_and_uri_inputs_give_the_same_events(tmp_path):
    rows = good_rows(50)
    text = ("\n".join(rows[:20] + ["1,2,3,pv,15"] + rows[20:]) + "\n").encode()
    plain = write(tmp_path, text)
    write(tmp_path, gzip.compress(text), "in.csv.gz")
    # named as plain CSV: the first bytes say how they are compressed
    write(tmp_path, bz2.compress(text), "bz2.csv")
    write(tmp_path, lzma.compress(text), "xz.csv")
    write(tmp_path, pa.compress(text, "zstd", asbytes=True), "zstd.csv")
    with zipfile.ZipFile(tmp_path / "in.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("UserBehavior.csv", text)
    memory = fsspec.filesystem("memory")
    memory_path = f"/ingest-{uuid.uuid4().hex}/in.csv"
    memory.pipe(memory_path, text)
    try:
        archives = [str(tmp_path / name) for name in ("in.csv.gz", "in.zip", "bz2.csv", "xz.csv", "zstd.csv")]
        sources = archives + [f"memory://{memory_path}", plain.as_uri()]
        results = [
            ingest(source, config(block_size=100), tmp_path / f"rejects{i}.csv", progress=False)
            for i, source in enumerate(sources)
        ]
        remote_rejects = f"memory://{memory_path}.rejects/rejects.csv"
        results.append(ingest(f"memory://{memory_path}", config(), remote_rejects, progress=False))
        assert memory.cat(remote_rejects).decode() == 'line,reason,raw\n21,ts_outside_window,"1,2,3,pv,15"\n'
    finally:
        memory.rm(memory_path.rsplit("/", 1)[0], recursive=True)
    expected = reference(rows)
    for events, report in results:
        assert_events_equal(events, expected)
        assert (report.lines, report.valid, report.rejected) == (51, 50, {"ts_outside_window": 1})


def test_progress_bar_on_stderr(tmp_path, capsys):
    path = write(tmp_path, "\n".join(good_rows()) + "\n")
    ingest(str(path), config(), tmp_path / "rejects.csv", progress=True)
    assert "ingest in.csv" in capsys.readouterr().err


@pytest.mark.skipif(not SLICE.is_file(), reason="the real data slice is not available")
def test_real_slice_ingests_as_it_is(tmp_path):
    events, report = ingest(str(SLICE), PrepareConfig(), tmp_path / "rejects.csv", progress=False)
    assert (report.lines, report.valid, report.rejected) == (96169, 96168, {"ts_outside_window": 1})
    assert read_rejects(report.rejects_path)[1][:2] == ["96169", "ts_outside_window"]
    assert np.all((events.ts >= T0) & (events.ts < T0 + 9 * SECONDS_PER_DAY))
    assert np.bincount(events.behavior, minlength=4).tolist() == [85773, 2144, 5292, 2959]
    small_blocks, _ = ingest(str(SLICE), PrepareConfig(block_size_bytes=1 << 17), tmp_path / "r", progress=False)
    assert_events_equal(small_blocks, events)


def test_prefetched_yields_every_item_in_order_raises_the_sources_error_and_closes_a_source_left_early():
    assert list(prefetched(range(5))) == [0, 1, 2, 3, 4]
    assert list(prefetched([])) == []

    def failing():
        yield 1
        raise UserError("bad block")

    with pytest.raises(UserError, match="^bad block$"):
        list(prefetched(failing()))
    closed = []

    def source():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    for item in prefetched(source()):
        if item == 2:
            break
    assert closed == [True]
