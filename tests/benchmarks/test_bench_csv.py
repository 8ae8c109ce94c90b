"""Where the benchmarks append their rows: the CSV header is written when the file is missing or empty (an empty --out
passes csv_out's check, and had got rows under no header)."""

import csv

import pytest

from benchmarks import bench_kernels
from benchmarks.common import append_csv

ROWS = [{"time": "2026-12-03 00:00:00", "provider": "model-only", "images_per_s": 512.5},
        {"time": "2026-12-03 00:00:00", "provider": "ray+deepspeed", "images_per_s": 301.0}]


@pytest.mark.parametrize("existing", [None, b""], ids=["missing", "empty"])
def test_append_csv_writes_the_header_to_a_missing_or_empty_file(tmp_path, existing):
    """A missing or 0-byte file gets the header, then the rows."""
    path = tmp_path / "sub" / "t.csv"
    if existing is not None:
        path.parent.mkdir()
        path.write_bytes(existing)
    append_csv(path, ROWS)
    assert path.read_text().splitlines()[0] == "time,provider,images_per_s"
    assert [r["provider"] for r in csv.DictReader(path.open())] == ["model-only", "ray+deepspeed"]


def test_append_csv_appends_to_a_results_file_under_its_header(tmp_path):
    """A file with rows gets more rows, not a second header."""
    path = tmp_path / "t.csv"
    append_csv(path, ROWS[:1])
    append_csv(path, ROWS[1:])
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines.count("time,provider,images_per_s") == 1


def test_kernels_row_into_an_empty_file_gets_the_header(tmp_path):
    """bench_kernels appends row by row through its own writer: an empty --out gets its header too."""
    path = tmp_path / "k.csv"
    path.write_bytes(b"")
    bench_kernels._append_csv(path, {"op": "gather", "provider": "triton", "fwd_ms": 0.5})
    assert path.read_text().splitlines()[0] == ",".join(bench_kernels.FIELDS)
    rows = list(csv.DictReader(path.open()))
    assert [(r["op"], r["provider"], r["fwd_ms"]) for r in rows] == [("gather", "triton", "0.5")]
