"""Dataset options of the wrong type or out of range are refused up front, by name."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recis_io import Column, Dataset, InvalidArgumentError

from .conftest import write


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory):
    p = tmp_path_factory.mktemp("args") / "cols.parquet"
    pq.write_table(pa.table({"label": [0, 1, 0], "x": [1.0, 2.0, 3.0]}), p)
    return p


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ([], r"columns must name at least one column, or be None for all"),
        (
            "label",
            r"columns must be a list of names or Column objects, got 'label'; pass \['label'\]",
        ),
        (Column("label"), r"columns must be a list of names or Column objects"),
        (["x", "x"], r"columns name 'x' more than once"),
        (["label", Column("label", fill=0)], r"columns name 'label' more than once"),
    ],
)
def test_bad_columns_are_refused(path, columns, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Dataset(path, batch_size=2, columns=columns)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("shuffle", "no", r"shuffle must be True or False, got 'no'"),
        ("drop_last", "false", r"drop_last must be True or False, got 'false'"),
        ("shuffle", 1, r"shuffle must be True or False, got 1"),
        ("num_threads", 0, r"num_threads must be an integer in \[1, 4096\], got 0"),
        ("num_threads", 10**6, r"num_threads must be an integer in \[1, 4096\]"),
        ("batch_size", 2**64, r"batch_size must be an integer in \[1, 9223372036854775807\]"),
        ("batch_size", 2**63 - 1, None),
        (
            "shuffle_window",
            2**64,
            r"shuffle_window must be an integer in \[1, 9223372036854775807\]",
        ),
        ("prefetch", 2**62, r"prefetch must be an integer in \[0, 4096\]"),
        ("prefetch", 4097, r"prefetch must be an integer in \[0, 4096\]"),
        ("epochs", 2**64, r"epochs must be an integer in \[0, 9223372036854775807\]"),
    ],
)
def test_options_are_checked_by_name(path, option, value, message) -> None:
    kwargs = {"batch_size": 2, option: value}
    if message is None:
        assert getattr(Dataset(path, **kwargs), option) == value
        return
    with pytest.raises(InvalidArgumentError, match=message):
        Dataset(path, **kwargs)


def test_columns_none_reads_every_column_and_num_threads_none_uses_the_cpus(path) -> None:
    ds = Dataset(path, batch_size=3, num_threads=None)
    assert ds.num_threads >= 1
    assert list(next(iter(ds))) == ["label", "x"]


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_a_column_with_an_empty_name_is_selected_like_any_other(tmp_path, fmt) -> None:
    p = write(pa.table({"": [1, 2, 3], "a": [4, 5, 6]}), tmp_path / f"empty.{fmt}", fmt, 3)
    assert list(next(iter(Dataset(p, batch_size=3)))) == ["", "a"]
    for columns in ([""], [Column("", fill=0)], ["a", ""]):
        batch = next(iter(Dataset(p, batch_size=3, columns=columns)))
        assert list(batch) == [c if isinstance(c, str) else c.name for c in columns]
        assert batch[""].tolist() == [1, 2, 3]
    with pytest.raises(InvalidArgumentError, match=r"column name must be a string, got 1"):
        Column(1)  # type: ignore[arg-type]


@pytest.mark.parametrize("variable", ["RANK", "WORLD_SIZE"])
def test_non_integer_rank_environment_names_the_variable(path, monkeypatch, variable) -> None:
    monkeypatch.setenv(variable, "abc")
    with pytest.raises(InvalidArgumentError, match=rf"environment variable {variable}='abc'"):
        Dataset(path, batch_size=2)


def test_a_rank_outside_the_world_names_where_each_value_came_from(path, monkeypatch) -> None:
    # RANK exported without WORLD_SIZE: the message must point at the environment, not at an
    # argument the caller never passed.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(
        InvalidArgumentError,
        match=r"got 1 \(rank from environment variable RANK=1, world_size from the default 1 "
        r"\(WORLD_SIZE is not set\)\)",
    ):
        Dataset(path, batch_size=2)
    with pytest.raises(InvalidArgumentError, match="world_size from the world_size argument"):
        Dataset(path, batch_size=2, world_size=1)
