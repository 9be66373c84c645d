from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recis_io import Dataset

from .conftest import write
from .test_values import collect

_INT = st.integers(-(2**40), 2**40)
_TEXT = st.text(max_size=6)

# (arrow type, strategy of one non-null value, is text, formats)
_KINDS = {
    "int64": (pa.int64(), _INT, False, ("parquet", "orc")),
    "int32": (pa.int32(), st.integers(-(2**31), 2**31 - 1), False, ("parquet", "orc")),
    "float64": (pa.float64(), st.floats(-1e9, 1e9), False, ("parquet", "orc")),
    "bool": (pa.bool_(), st.booleans(), False, ("parquet", "orc")),
    "string": (pa.string(), _TEXT, True, ("parquet", "orc")),
    "list": (pa.list_(pa.int64()), st.lists(_INT, max_size=5), False, ("parquet", "orc")),
    "list2": (
        pa.list_(pa.list_(pa.int32())),
        st.lists(st.lists(st.integers(-100, 100), max_size=3), max_size=3),
        False,
        ("parquet", "orc"),
    ),
    "strlist": (pa.list_(pa.string()), st.lists(_TEXT, max_size=3), True, ("parquet", "orc")),
    "fixed": (
        pa.list_(pa.float32(), 2),
        st.lists(st.integers(-1000, 1000).map(float), min_size=2, max_size=2),
        False,
        ("parquet",),
    ),
}


@st.composite
def tables(draw: st.DrawFn) -> tuple[pa.Table, str, frozenset[str]]:
    fmt = draw(st.sampled_from(["parquet", "orc"]))
    kinds = [k for k, v in _KINDS.items() if fmt in v[3]]
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4))
    rows = draw(st.integers(0, 60))
    cols = {}
    for i, kind in enumerate(chosen):
        typ, values, _, _ = _KINDS[kind]
        cols[f"c{i}_{kind}"] = pa.array(draw(st.lists(values, min_size=rows, max_size=rows)), typ)
    text = frozenset(n for n in cols if _KINDS[n.split("_", 1)[1]][2])
    return pa.table(cols), fmt, text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tables(), group=st.integers(1, 20), batch=st.integers(1, 25))
def test_random_schemas_round_trip(case, group: int, batch: int) -> None:
    table, fmt, text = case
    with tempfile.TemporaryDirectory() as tmp:
        path = write(table, Path(tmp) / f"r.{fmt}", fmt, group)
        ds = Dataset(path, batch_size=batch, num_threads=2)
        sizes = [len(b) for b in ds]
        assert sum(sizes) == table.num_rows
        assert all(s == batch for s in sizes[:-1])
        got = collect(ds, text=text)
    if table.num_rows == 0:
        return
    expected = table.to_pydict()
    for name, values in expected.items():
        assert got[name] == values, name
