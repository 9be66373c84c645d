"""The contracts between the packages, end to end on small files.

recis-io columns → recis-features → recis-embedding → a model → recis-train, each step checked
against references written here from the definitions (RESEARCH.md, DESIGN.md and the package
docs), not against the packages' own code.

Run as a script (``python tests/test_pipeline.py DATA OUT RESULT EPOCHS_IN [PAUSE_AT]``) it is the
training job of the kill-and-restart test.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import recis_embedding as emb
import recis_features as rf
import recis_io
from recis_kernels import RaggedTensor
from recis_train import (
    Hook,
    MultiTask,
    Online,
    Task,
    Trainer,
    TrainingArguments,
    WindowResult,
    seed_everything,
)
from recis_train.metrics import AUROC, GAUC

# ---------------------------------------------------------------------------------------------
# Reference definitions (RESEARCH.md "Hashes and metrics"): the scalar pure-Python FarmHash
# Fingerprint64 (farmhashna::Hash64), MurmurHash64A and MurmurHash3 64-bit finalizer of
# recis-kernels' tests, written from the published algorithms; and the unsigned remainder.

M64 = (1 << 64) - 1


def _load_hash_reference() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "packages/recis-kernels/tests/hash_reference.py"
    spec = importlib.util.spec_from_file_location("recis_hash_reference", path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_hashes = _load_hash_reference()
K2 = _hashes.K2
farm_fingerprint64, murmur64a, fmix64 = _hashes.farm64, _hashes.murmur64a, _hashes.fmix64


def signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def hash_id(algorithm: str, data: bytes, buckets: int = 0) -> int:
    """The int64 id of a string: its hash, reduced unsigned by ``buckets`` when > 0."""
    h = farm_fingerprint64(data) if algorithm == "farm" else murmur64a(data)
    return h % buckets if buckets else signed(h)


def umod(v: int, n: int) -> int:
    return (v & M64) % n


def cross_id(a: int, b: int) -> int:
    pair = (a & M64).to_bytes(8, "little") + (b & M64).to_bytes(8, "little")
    return signed(murmur64a(pair))


def test_the_references_reproduce_published_values() -> None:
    # BigQuery: FARM_FINGERPRINT("alphabet"); FarmHash's and Murmur's empty-input values.
    assert signed(farm_fingerprint64(b"alphabet")) == -2427165924636348523
    assert farm_fingerprint64(b"") == K2
    assert murmur64a(b"") == 0
    assert recis_io.hash_bytes(b"alphabet", "farm") == -2427165924636348523


# ---------------------------------------------------------------------------------------------
# Strings hashed while reading (recis-io) == hashed by a feature (recis-features) == reference.

FILL_ID = -77


def _strings(rng: random.Random, n: int) -> list[str | None]:
    alphabet = "abcxyz0123 é中🙂"
    out: list[str | None] = []
    for i in range(n):
        if i % 7 == 3:
            out.append(None)
        elif i % 7 == 5:
            out.append("")
        else:  # every FarmHash length class: 0-3, 4-7, 8-16, 17-32, 33-64, > 64 bytes
            length = rng.choice([1, 2, 3, 5, 7, 8, 12, 16, 17, 30, 33, 60, 64, 65, 127, 200])
            out.append("".join(rng.choice(alphabet) for _ in range(length)))
    return out


def _string_lists(rng: random.Random, n: int) -> list[list[str | None] | None]:
    out: list[list[str | None] | None] = []
    for i in range(n):
        if i % 6 == 2:
            out.append(None)
        elif i % 6 == 4:
            out.append([])
        else:
            out.append(_strings(rng, rng.randrange(1, 5)))
    return out


def _write(table: pa.Table, path: Path, row_group_size: int) -> None:
    if path.suffix == ".orc":
        orc.write_table(table, path, stripe_size=1024, batch_size=row_group_size)
    else:
        pq.write_table(table, path, row_group_size=row_group_size)


@pytest.mark.parametrize("suffix", [".parquet", ".orc"])
@pytest.mark.parametrize(
    ("algorithm", "buckets"), [("farm", 0), ("murmur", 0), ("farm", 1000), ("murmur", 7919)]
)
def test_strings_hash_alike_in_reader_features_and_reference(
    tmp_path: Path, suffix: str, algorithm: str, buckets: int
) -> None:
    rng = random.Random(f"{suffix}{algorithm}{buckets}")
    strings, lists = _strings(rng, 41), _string_lists(rng, 41)
    table = pa.table(
        {"s": pa.array(strings, pa.string()), "ls": pa.array(lists, pa.list_(pa.string()))}
    )
    path = tmp_path / f"strings{suffix}"
    _write(table, path, row_group_size=9)

    def utf8(s: str | None) -> bytes:
        return b"" if s is None else s.encode()

    hashed = recis_io.Dataset(
        [str(path)],
        batch_size=8,
        columns=[
            recis_io.Column("s", hash=algorithm, buckets=buckets, fill=FILL_ID),
            recis_io.Column("ls", hash=algorithm, buckets=buckets, fill=FILL_ID),
        ],
    )
    raw = recis_io.Dataset(
        [str(path)],
        batch_size=8,
        columns=[recis_io.Column("s", fill=""), recis_io.Column("ls", fill="")],
    )
    engine = rf.FeatureEngine(
        [
            rf.Feature("s").select("s").hash(algorithm, buckets=buckets),
            rf.Feature("ls").select("ls").hash(algorithm, buckets=buckets),
        ]
    )
    read_s, read_ls, read_lengths = [], [], []
    feat_s, feat_ls, feat_lengths = [], [], []
    for h_batch, r_batch in zip(hashed, raw, strict=True):
        read_s += h_batch["s"].tolist()
        read_ls += h_batch["ls"].values.tolist()
        read_lengths += h_batch["ls"].offsets[0].diff().tolist()
        out = engine(r_batch)
        feat_s += out["s"].tolist()
        feat_ls += out["ls"].values.tolist()
        feat_lengths += out["ls"].offsets[0].diff().tolist()

    # The reader fills a null with the given id; the features see the filled "" string.
    assert read_s == [
        FILL_ID if s is None else hash_id(algorithm, utf8(s), buckets) for s in strings
    ]
    assert feat_s == [hash_id(algorithm, utf8(s), buckets) for s in strings]
    lengths = [len(row or []) for row in lists]
    assert read_lengths == feat_lengths == lengths
    items = [s for row in lists for s in (row or [])]
    assert read_ls == [
        FILL_ID if s is None else hash_id(algorithm, utf8(s), buckets) for s in items
    ]
    assert feat_ls == [hash_id(algorithm, utf8(s), buckets) for s in items]


# ---------------------------------------------------------------------------------------------
# recis-io batch → FeatureEngine (every op kind) → EmbeddingEngine (every combiner) → model.

DIM = 4
BOUNDS = [0.5, 2.0, 10.0]
MH_BUCKETS = [11, 13]
GOLDEN = 0x9E3779B97F4A7C15


def _pipeline_rows(rng: random.Random, n: int, start: int) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {k: [] for k in _PIPELINE_SCHEMA.names}
    for i in range(start, start + n):
        rows["row"].append(i)
        rows["label"].append(float(rng.random() < 0.5))
        rows["price"].append(None if i % 5 == 1 else rng.uniform(0, 20))
        rows["uid"].append(rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randrange(-(2**40), 2**40)]))
        rows["item"].append(rng.randrange(100))
        rows["hist"].append(
            None
            if i % 6 == 1
            else [rng.randrange(-5, 30) for _ in range(rng.choice([0, 1, 2, 3, 5]))]
        )
        rows["sess"].append(
            [
                [rng.randrange(50) for _ in range(rng.randrange(0, 3))]
                for _ in range(rng.choice([0, 1, 2, 3]))
            ]
        )
        rows["tags"].append(
            None
            if i % 4 == 2
            else [rng.choice(["a", "bb", "", "ccc", "日本"]) for _ in range(i % 3)]
        )
        rows["city"].append(rng.choice(["Hangzhou", "Beijing", "", "São Paulo"]))
        rows["pair"].append([rng.uniform(-1, 1), rng.uniform(-1, 1)])
    return rows


_PIPELINE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("label", pa.float32()),
        ("price", pa.float32()),
        ("uid", pa.int64()),
        ("item", pa.int64()),
        ("hist", pa.list_(pa.int64())),
        ("sess", pa.list_(pa.list_(pa.int64()))),
        ("tags", pa.list_(pa.string())),
        ("city", pa.string()),
        ("pair", pa.list_(pa.float32(), 2)),
    ]
)


def _pipeline_files(tmp_path: Path) -> tuple[list[Path], pa.Table]:
    """Two files with a 0-row file between them; 37 rows in all."""
    rng = random.Random(5)
    parts = [
        pa.table(_pipeline_rows(rng, 23, 0), schema=_PIPELINE_SCHEMA),
        pa.table(_pipeline_rows(rng, 0, 23), schema=_PIPELINE_SCHEMA),
        pa.table(_pipeline_rows(rng, 14, 23), schema=_PIPELINE_SCHEMA),
    ]
    paths = []
    for k, part in enumerate(parts):
        path = tmp_path / f"part-{k}.parquet"
        pq.write_table(part, path, row_group_size=5)
        paths.append(path)
    return paths, pa.concat_tables(parts)


def _features() -> list[rf.Feature]:
    return [
        rf.Feature("price_log").select("price").fill_missing(0.0).log1p(),
        rf.Feature("price_norm").select("price").fill_missing(1.0).normalize(2.0, 4.0),
        rf.Feature("price_bucket").select("price").fill_missing(0.0).bucketize(BOUNDS),
        rf.Feature("uid").select("uid").mod(97),
        rf.Feature("uid_mh").select("uid").multi_hash(MH_BUCKETS),
        rf.Feature("ux").select_fields(["uid", "item"]).cross().mod(1 << 20),
        rf.Feature("hist").select("hist").truncate(3, side="tail").mod(1000),
        rf.Feature("hist_raw").select("hist"),
        rf.Feature("sess").select("sess").truncate(2, side="head", levels=3),
        rf.Feature("tags").select("tags").truncate(1, side="head").hash("murmur", buckets=50),
        rf.Feature("city").select("city").hash("farm"),
        rf.Feature("pair2").select("pair").map(lambda x: x * 2),
    ]


def _options() -> dict[str, emb.EmbeddingOption]:
    init = emb.Normal(0.0, 0.5, seed=3)
    return {
        "uid": emb.EmbeddingOption(DIM, initializer=init),
        "uid_mh": emb.EmbeddingOption(DIM, initializer=init, combiner="sqrtn"),
        "ux": emb.EmbeddingOption(DIM, initializer=init),
        "price_bucket": emb.EmbeddingOption(DIM, initializer=init),
        "hist": emb.EmbeddingOption(DIM, shared_name="items", initializer=init, combiner="mean"),
        "hist_tile": emb.EmbeddingOption(
            DIM,
            shared_name="items",
            initializer=init,
            combiner="tile",
            combiner_kwargs={"tile_len": 2},
        ),
        "hist_seq": emb.EmbeddingOption(DIM, shared_name="items", initializer=init, combiner=None),
        "sess": emb.EmbeddingOption(DIM, shared_name="items", initializer=init, combiner="sum"),
        "tags": emb.EmbeddingOption(DIM, initializer=init, combiner="sqrtn"),
        "city": emb.EmbeddingOption(DIM, initializer=init),
    }


def _reference_features(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """What each feature must give per row, from the raw column values."""
    ref: dict[str, list[Any]] = {k: [] for k in ("price_log", "price_norm", "price_bucket")}
    ref |= {k: [] for k in ("uid", "uid_mh", "ux", "hist", "sess", "tags", "city", "pair2")}
    for i in range(len(rows["row"])):
        price = rows["price"][i]
        ref["price_log"].append(math.log1p(0.0 if price is None else price))
        ref["price_norm"].append(((1.0 if price is None else price) - 2.0) / 4.0)
        p32 = float(torch.tensor(0.0 if price is None else price, dtype=torch.float32))
        ref["price_bucket"].append(sum(b <= p32 for b in BOUNDS))
        uid, item = rows["uid"][i], rows["item"][i]
        ref["uid"].append(umod(uid, 97))
        ref["uid_mh"].append(
            [fmix64((uid + (k + 1) * GOLDEN) & M64) % b for k, b in enumerate(MH_BUCKETS)]
        )
        ref["ux"].append(umod(cross_id(uid, item), 1 << 20))
        ref["hist"].append([umod(v, 1000) for v in (rows["hist"][i] or [])[-3:]])
        sess = rows["sess"][i][:2]
        ref["sess"].append(sess + [[]] * (2 - len(sess)))
        ref["tags"].append([hash_id("murmur", t.encode(), 50) for t in (rows["tags"][i] or [])[:1]])
        ref["city"].append(hash_id("farm", rows["city"][i].encode()))
        ref["pair2"].append([2 * v for v in rows["pair"][i]])
    return ref


def _rows_of(ragged: Any) -> list[list[int]]:
    values, offsets = ragged.values.tolist(), ragged.offsets[0].tolist()
    return [values[a:b] for a, b in itertools.pairwise(offsets)]


def _rows3_of(ragged: Any) -> list[list[list[int]]]:
    values = ragged.values.tolist()
    outer, inner = (o.tolist() for o in ragged.offsets)
    lists = [values[a:b] for a, b in itertools.pairwise(inner)]
    return [lists[a:b] for a, b in itertools.pairwise(outer)]


class _Vectors:
    """id -> embedding as the tables hold it (read back through each table's own lookup)."""

    def __init__(self, engine: emb.EmbeddingEngine) -> None:
        self.engine = engine

    def __call__(self, table: str, ids: Sequence[int]) -> torch.Tensor:
        physical, index = self.engine.table(table)
        if not ids:
            return torch.zeros(0, DIM, dtype=torch.float64)
        found = physical.find(torch.tensor(list(ids), dtype=torch.int64), index)
        assert bool((found >= 0).all()), f"{table}: ids {ids} were not inserted"
        return physical.embeddings(torch.tensor(list(ids), dtype=torch.int64), index).double()


def _pool(vectors: torch.Tensor, combiner: str) -> torch.Tensor:
    if vectors.shape[0] == 0:
        return torch.zeros(DIM, dtype=torch.float64)
    total = vectors.sum(0)
    if combiner == "mean":
        return total / vectors.shape[0]
    if combiner == "sqrtn":
        return total / math.sqrt(vectors.shape[0])
    return total


def _check_embeddings(out: dict[str, Any], ref: dict[str, list[Any]], vec: _Vectors) -> None:
    close = {"rtol": 1e-5, "atol": 1e-6}
    for i in range(len(ref["uid"])):
        torch.testing.assert_close(out["uid"][i].double(), vec("uid", [ref["uid"][i]])[0], **close)
        torch.testing.assert_close(
            out["uid_mh"][i].double(), _pool(vec("uid_mh", ref["uid_mh"][i]), "sqrtn"), **close
        )
        torch.testing.assert_close(out["ux"][i].double(), vec("ux", [ref["ux"][i]])[0], **close)
        torch.testing.assert_close(
            out["price_bucket"][i].double(),
            vec("price_bucket", [ref["price_bucket"][i]])[0],
            **close,
        )
        hist = vec("items", ref["hist"][i])
        torch.testing.assert_close(out["hist"][i].double(), _pool(hist, "mean"), **close)
        tile = torch.zeros(2, DIM, dtype=torch.float64)
        tile[: min(2, len(hist))] = hist[:2]
        torch.testing.assert_close(out["hist_tile"][i].double(), tile.flatten(), **close)
        length = out["hist_seq"].shape[1]
        seq = torch.zeros(length, DIM, dtype=torch.float64)
        seq[: len(hist)] = hist
        torch.testing.assert_close(out["hist_seq"][i].double(), seq, **close)
        assert out["hist_seq_mask"][i].tolist() == [k < len(hist) for k in range(length)]
        for s, inner in enumerate(ref["sess"][i]):
            torch.testing.assert_close(
                out["sess"][i, s].double(), _pool(vec("items", inner), "sum"), **close
            )
        torch.testing.assert_close(
            out["tags"][i].double(), _pool(vec("tags", ref["tags"][i]), "sqrtn"), **close
        )
        torch.testing.assert_close(
            out["city"][i].double(), vec("city", [ref["city"][i]])[0], **close
        )


class _Head(nn.Module):
    """Every embedding output and dense feature into one logit per row."""

    def __init__(self) -> None:
        super().__init__()
        width = DIM * 8 + 2 * DIM + DIM + 2 + 2  # pooled and sequence, tile, sess, floats, pair
        self.linear = nn.Linear(width, 1)

    def forward(self, out: dict[str, Any]) -> torch.Tensor:
        pooled = [out[k] for k in ("uid", "uid_mh", "ux", "price_bucket", "hist", "tags", "city")]
        seq = (out["hist_seq"] * out["hist_seq_mask"].unsqueeze(-1)).sum(1)
        floats = torch.stack([out["price_log"], out["price_norm"]], dim=1)
        x = torch.cat(
            [*pooled, seq, out["hist_tile"], out["sess"].sum(1), floats, out["pair2"]], dim=1
        )
        return self.linear(x).squeeze(1)


def _empty_batch() -> dict[str, Any]:
    """A batch of 0 rows with every column kind, laid out as recis-io lays out columns."""
    empty = torch.zeros(0, dtype=torch.int64)
    start = torch.zeros(1, dtype=torch.int64)
    return {
        "row": empty,
        "label": torch.zeros(0),
        "price": torch.zeros(0),
        "uid": empty,
        "item": empty,
        "hist": RaggedTensor(empty, [start]),
        "sess": RaggedTensor(empty, [start, start]),
        "tags": RaggedTensor(torch.zeros(0, dtype=torch.uint8), [start, start]),
        "city": RaggedTensor(torch.zeros(0, dtype=torch.uint8), [start]),
        "pair": torch.zeros(0, 2),
    }


def test_reader_batches_through_features_embeddings_and_a_model(tmp_path: Path) -> None:
    paths, table = _pipeline_files(tmp_path)
    rows = table.to_pydict()
    ref = _reference_features(rows)
    dataset = recis_io.Dataset(
        [str(p) for p in paths],
        batch_size=8,
        columns=[
            *(n for n in _PIPELINE_SCHEMA.names if n not in ("tags", "city")),
            recis_io.Column("tags", fill=""),
            recis_io.Column("city", fill=""),
        ],
    )
    seed_everything(0)
    features = rf.FeatureEngine(_features())
    embeddings = emb.EmbeddingEngine(_options())
    head = _Head()
    dense_opt = torch.optim.SGD(head.parameters(), lr=0.1)
    sparse_opt = emb.SparseSGD(embeddings, lr=0.1)
    vec = _Vectors(embeddings)
    sizes, start = [], 0
    for batch in dataset:
        n = len(batch)
        sizes.append(n)
        got = features(batch)
        here = {k: v[start : start + n] for k, v in ref.items()}
        # Columns no feature reads, and a select without ops, are the reader's memory.
        assert got["row"] is batch["row"]
        assert got["label"] is batch["label"]
        assert got["hist_raw"].values.data_ptr() == batch["hist"].values.data_ptr()
        assert got["hist_raw"].offsets[0].data_ptr() == batch["hist"].offsets[0].data_ptr()
        wrapped = RaggedTensor(batch["sess"].values, list(batch["sess"].offsets))
        assert wrapped.values.data_ptr() == batch["sess"].values.data_ptr()
        assert [o.data_ptr() for o in wrapped.offsets] == [
            o.data_ptr() for o in batch["sess"].offsets
        ]
        assert got["row"].tolist() == rows["row"][start : start + n]
        torch.testing.assert_close(
            got["price_log"], torch.tensor(here["price_log"]), rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(
            got["price_norm"], torch.tensor(here["price_norm"]), rtol=1e-6, atol=1e-6
        )
        assert got["price_bucket"].tolist() == here["price_bucket"]
        assert got["uid"].tolist() == here["uid"]
        assert got["uid_mh"].tolist() == here["uid_mh"]
        assert got["ux"].values.tolist() == here["ux"]
        assert got["ux"].offsets[0].tolist() == list(range(n + 1))
        assert _rows_of(got["hist"]) == here["hist"]
        assert _rows3_of(got["sess"]) == here["sess"]
        assert _rows_of(got["tags"]) == here["tags"]
        assert got["city"].tolist() == here["city"]
        torch.testing.assert_close(got["pair2"], torch.tensor(here["pair2"]))

        # The same ids feed the pooled, tiled and sequence outputs of the shared "items" table.
        got["hist_tile"] = got["hist_seq"] = got["hist"]
        out = embeddings(got)
        assert out["label"] is batch["label"]
        assert out["hist_seq"].shape[:2] == out["hist_seq_mask"].shape
        assert out["sess"].shape == (n, 2, DIM)
        _check_embeddings(out, here, vec)
        # A reader's 3-level column straight into the embeddings: (B, S, D), S its longest row.
        direct = embeddings({**got, "sess": batch["sess"]})["sess"]
        raw_sess = rows["sess"][start : start + n]
        assert direct.shape == (n, max(len(r) for r in raw_sess), DIM)
        for i, row in enumerate(raw_sess):
            for s in range(direct.shape[1]):
                inner = vec("items", row[s]) if s < len(row) else torch.zeros(0, DIM)
                torch.testing.assert_close(
                    direct[i, s].double(), _pool(inner, "sum"), rtol=1e-5, atol=1e-6
                )

        logits = head(out)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        assert head.linear.weight.grad is not None
        assert bool(head.linear.weight.grad.abs().sum() > 0)
        before = vec("uid", here["uid"][:1])
        dense_opt.step()
        sparse_opt.step()
        assert not torch.equal(vec("uid", here["uid"][:1]), before), "the sparse step missed"
        start += n
    # 37 rows over a 23-row file, a 0-row file and a 14-row file: fixed-size batches across
    # files, the last one smaller.
    assert sizes == [8, 8, 8, 8, 5]
    whole = recis_io.Dataset([str(p) for p in paths], batch_size=37, columns=["row"])
    assert [len(b) for b in whole] == [37]  # rows that fill the last batch: no empty batch

    # An empty batch goes through every stage and gives 0-row outputs and no table growth.
    rows_before = embeddings.rows_per_table()
    got = features(_empty_batch())
    got["hist_tile"] = got["hist_seq"] = got["hist"]
    out = embeddings(got)
    assert out["uid"].shape == (0, DIM)
    assert out["hist_tile"].shape == (0, 2 * DIM)
    # (B, S, D) with S the longest row: no row, S = 0
    assert out["sess"].shape == (0, 0, DIM)
    assert out["hist"].shape == (0, DIM)
    assert out["hist_seq"].shape[0] == out["hist_seq_mask"].shape[0] == 0
    logits = head(out)
    assert logits.shape == (0,)
    assert embeddings.rows_per_table() == rows_before


# ---------------------------------------------------------------------------------------------
# MultiTask masks over recis-io columns: nulls filled while reading mark unknown labels.


def test_multitask_masks_over_reader_columns(tmp_path: Path) -> None:
    click = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    conv = [1.0, None, None, 0.0, 0.0, 1.0, None, 0.0, None, 1.0, 1.0, 0.0]
    dwell = [0.5, 0.2, None, 0.9, None, 0.1, 0.3, None, 0.7, 0.8, 0.0, 1.0]
    x = [[float(i % 3), float(i) / 12] for i in range(12)]
    path = tmp_path / "labels.parquet"
    pq.write_table(
        pa.table(
            {
                "click": pa.array(click, pa.float32()),
                "conv": pa.array(conv, pa.float32()),
                "dwell": pa.array(dwell, pa.float32()),
                "x": pa.array(x, pa.list_(pa.float32(), 2)),
            }
        ),
        path,
        row_group_size=5,
    )
    dataset = recis_io.Dataset(
        [str(path)],
        batch_size=12,
        columns=["click", recis_io.Column("conv", fill=-1.0), "dwell", "x"],
    )
    torch.manual_seed(0)
    body = nn.Linear(2, 3)
    shared = _Body(body)
    heads = {name: nn.Linear(3, 1) for name in ("click", "conv", "dwell")}
    model = MultiTask(
        shared,
        [
            Task("click", heads["click"], label="click"),
            # conversions only count on clicked rows; -1 marks an unknown (null) one
            Task("conv", heads["conv"], label="conv", mask="click", missing=-1, weight=0.5),
            # NaN (a float null read without fill) marks an unknown dwell
            Task("dwell", heads["dwell"], label="dwell", missing=float("nan")),
        ],
    )
    (batch,) = list(dataset)
    out = model(batch)
    hidden = shared(batch)

    def expected(task: str, keep: list[bool], labels: list[float]) -> torch.Tensor:
        logits = heads[task](hidden).squeeze(1)[torch.tensor(keep)]
        target = torch.tensor([v for v, k in zip(labels, keep, strict=True) if k])
        return nn.functional.binary_cross_entropy_with_logits(logits, target)

    keep_conv = [c == 1.0 and v is not None for c, v in zip(click, conv, strict=True)]
    keep_dwell = [v is not None for v in dwell]
    torch.testing.assert_close(out["losses"]["click"], expected("click", [True] * 12, click))
    torch.testing.assert_close(out["losses"]["conv"], expected("conv", keep_conv, conv))  # type: ignore[arg-type]
    torch.testing.assert_close(out["losses"]["dwell"], expected("dwell", keep_dwell, dwell))  # type: ignore[arg-type]
    assert out["labels"]["conv"].tolist() == [v for v, k in zip(conv, keep_conv, strict=True) if k]
    assert out["predictions"]["dwell"].shape == (sum(keep_dwell),)
    assert out["weights"]["conv"] == 0.5
    # The masked rows get no gradient through the conversion head.
    out["losses"]["conv"].backward()
    grad = body.weight.grad
    assert grad is not None
    body.weight.grad = None
    expected("conv", keep_conv, conv).backward()  # type: ignore[arg-type]
    torch.testing.assert_close(body.weight.grad, grad)


class _Body(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, batch: Any) -> torch.Tensor:
        return torch.relu(self.linear(batch["x"]))


# ---------------------------------------------------------------------------------------------
# A whole Trainer run on recis-io files, killed with SIGKILL and started again.

TRAIN_ROWS, TRAIN_BATCH = 256, 16
KILL_AT = 11  # of 16 steps: 2 epochs of 16 batches, 2 micro-batches a step
USERS = [f"u{k}" for k in range(40)]


def _training_files(root: Path) -> list[Path]:
    rng = random.Random(9)
    files = []
    for k, (start, n) in enumerate([(0, 100), (100, 0), (100, 156)]):
        d0 = [rng.gauss(0, 1) for _ in range(n)]
        users = [rng.choice(USERS) for _ in range(n)]
        click = [float(rng.random() < 1 / (1 + math.exp(-2 * v))) for v in d0]
        conv = [None if rng.random() < 0.3 else float(c and rng.random() < 0.5) for c in click]
        table = pa.table(
            {
                "row": pa.array(range(start, start + n), pa.int64()),
                "d0": pa.array(d0, pa.float32()),
                "user": pa.array(users, pa.string()),
                "item": pa.array([rng.randrange(30) for _ in range(n)], pa.int64()),
                "hist": pa.array(
                    [[rng.randrange(30) for _ in range(rng.randrange(4))] for _ in range(n)],
                    pa.list_(pa.int64()),
                ),
                "click": pa.array(click, pa.float32()),
                "conv": pa.array(conv, pa.float32()),
            }
        )
        path = root / f"train-{k}.parquet"
        pq.write_table(table, path, row_group_size=24)
        files.append(path)
    return files


def _reader(
    files: Sequence[Path], *, shuffle: bool, batch_size: int, epochs: int = 1
) -> recis_io.Dataset:
    return recis_io.Dataset(
        [str(f) for f in files],
        batch_size=batch_size,
        columns=[
            "row",
            "d0",
            recis_io.Column("user", hash="farm", buckets=1 << 20, fill=0),
            "item",
            "hist",
            "click",
            recis_io.Column("conv", fill=-1.0),
        ],
        shuffle=shuffle,
        seed=4,
        epochs=epochs,
        shuffle_window=64,
    )


class _TrainBody(nn.Module):
    """Features and dynamic tables under a small MLP; counts the rows it trains on per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.features = rf.FeatureEngine(
            [
                rf.Feature("user").select("user").mod(1009),
                rf.Feature("item").select("item"),
                rf.Feature("hist").select("hist").truncate(2, side="tail"),
                rf.Feature("d0").select("d0").normalize(0.0, 2.0),
            ]
        )
        self.embeddings = emb.EmbeddingEngine(
            {
                "user": emb.EmbeddingOption(DIM),
                "item": emb.EmbeddingOption(DIM, shared_name="items"),
                "hist": emb.EmbeddingOption(DIM, shared_name="items", combiner="mean"),
            }
        )
        self.mlp = nn.Sequential(nn.Linear(3 * DIM + 1, 8), nn.ReLU(), nn.Dropout(0.1))
        self.register_buffer("seen", torch.zeros(2, TRAIN_ROWS, dtype=torch.int64))

    def forward(self, batch: Any) -> torch.Tensor:
        if self.training:
            # Epochs hold TRAIN_ROWS rows and no batch spans two: the rows counted so far say
            # which epoch this batch belongs to.
            epoch = int(self.seen.sum()) // TRAIN_ROWS
            self.seen[epoch, batch["row"]] += 1
        out = self.embeddings(self.features(batch))
        x = torch.cat([out["user"], out["item"].flatten(1), out["hist"], out["d0"][:, None]], 1)
        return self.mlp(x)


class _Pause(Hook):
    """Prints each step; at ``pause_at`` waits to be killed (the first, killed run only)."""

    def __init__(self, pause_at: int | None) -> None:
        self.pause_at = pause_at

    def on_step_end(self, trainer: Trainer, logs: Any) -> None:
        print(f"step {trainer.global_step}", flush=True)
        if trainer.global_step == self.pause_at:
            time.sleep(120)


def _train_job(
    files: Sequence[Path], out: Path, epochs_in: str, pause_at: int | None = None
) -> dict[str, Any]:
    """Train 2 epochs with checkpoints (resuming from any), evaluate; return the final state.

    ``epochs_in``: whether the trainer (``"trainer"``) or the reader (``"reader"``) makes
    the two passes over the files.
    """
    reader_epochs, trainer_epochs = {"trainer": (1, 2), "reader": (2, 1)}[epochs_in]
    model, dense, sparse = _build_model()
    schedule = torch.optim.lr_scheduler.StepLR(dense, step_size=5, gamma=0.5)
    args = TrainingArguments(
        output_dir=str(out),
        epochs=trainer_epochs,
        save_every=3,
        max_to_keep=2,
        gradient_accumulation_steps=2,
        grad_clip=1.0,
        device="cpu",
        deterministic=True,
        resume=True,
    )
    trainer = Trainer(
        model,
        args,
        train_data=_reader(files, shuffle=True, batch_size=TRAIN_BATCH, epochs=reader_epochs),
        eval_data=lambda: _reader(files, shuffle=False, batch_size=64),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        lr_schedulers=[schedule],
        hooks=[_Pause(pause_at)],
    )
    trainer.train()
    metrics = trainer.evaluate()
    return {"step": trainer.global_step, "metrics": metrics, **_final_state(model, sparse, out)}


def _build_model() -> tuple[MultiTask, torch.optim.Optimizer, emb.SparseOptimizer]:
    seed_everything(0)
    model = MultiTask(
        _TrainBody(),
        [
            Task("click", nn.Linear(8, 1), label="click"),
            Task("conv", nn.Linear(8, 1), label="conv", mask="click", missing=-1, weight=0.5),
        ],
    )
    dense = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    return model, dense, emb.SparseAdam(model, lr=0.02)


def _final_state(model: nn.Module, sparse: emb.SparseOptimizer, out: Path) -> dict[str, Any]:
    """Dense state and every table's ids, embeddings and optimizer slots, as saved."""
    tables = out / "final-tables"
    emb.save(tables, model, sparse)
    reader = emb.CheckpointReader(tables)
    with emb.tables_saved_separately():
        dense = {k: v.clone() for k, v in model.state_dict().items()}
    return {"dense": dense, "tables": {t: reader.read_all(t) for t in reader.tables()}}


def _assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["dense"].keys() == want["dense"].keys()
    for key, value in want["dense"].items():
        assert torch.equal(got["dense"][key], value), key
    assert got["tables"].keys() == want["tables"].keys() == {"user", "items"}
    for table, tensors in want["tables"].items():
        assert got["tables"][table].keys() == tensors.keys()
        assert {"ids", "embeddings"} <= tensors.keys()
        assert len(tensors) > 2, tensors.keys()  # optimizer slots too
        for key, value in tensors.items():
            assert torch.equal(got["tables"][table][key], value), (table, key)


@pytest.mark.parametrize("epochs_in", ["trainer", "reader"])
def test_a_killed_training_run_restarts_to_the_uninterrupted_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], epochs_in: str
) -> None:
    files = _training_files(tmp_path)
    cut_dir = tmp_path / "cut"
    command = [
        sys.executable,
        __file__,
        str(tmp_path),
        str(cut_dir),
        str(tmp_path / "killed.pt"),
        epochs_in,
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job run as a script: bit-exact results need the same
    try:
        with subprocess.Popen(
            [*command, str(KILL_AT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ) as killed:
            try:
                # The uninterrupted run, here, while the job runs up to its kill.
                whole = _train_job(files, tmp_path / "whole", epochs_in)
                assert killed.stdout is not None
                if f"step {KILL_AT}" not in _lines(killed.stdout):
                    pytest.fail(f"the job ended with {killed.wait()} before step {KILL_AT}")
                killed.send_signal(signal.SIGKILL)
                assert killed.wait() == -signal.SIGKILL
            finally:
                if killed.poll() is None:  # a failure above: never leave the job waiting
                    killed.kill()
        assert not (tmp_path / "killed.pt").exists()
        capsys.readouterr()
        # Started again (everything built afresh, as the script does) on the killed job's
        # output directory: it resumes from its last checkpoint, step 9, not from the start.
        resumed = _train_job(files, cut_dir, epochs_in)
        assert capsys.readouterr().out.split()[:2] == ["step", "10"]
    finally:
        torch.set_num_threads(threads)

    assert resumed["step"] == whole["step"] == 16
    _assert_same_state(resumed, whole)
    # Every row trained on exactly once in each of the two epochs, across the restart.
    assert torch.equal(whole["dense"]["body.seen"], torch.ones(2, TRAIN_ROWS, dtype=torch.int64))
    assert resumed["metrics"] == whole["metrics"]
    assert {"click/auc", "conv/auc", "loss/conv"} <= whole["metrics"].keys()


def _auc(preds: Sequence[float], labels: Sequence[float]) -> float:
    """The rank statistic: P(positive > negative), ties counting one half."""
    pos = [p for p, y in zip(preds, labels, strict=True) if y == 1]
    neg = [p for p, y in zip(preds, labels, strict=True) if y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_evaluation_over_reader_batches_is_exact_whatever_the_batch_size(tmp_path: Path) -> None:
    files = _training_files(tmp_path)
    model, dense, sparse = _build_model()
    model.group_column = "user"  # hashed while reading: GAUC per user across batches
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path / "out"), device="cpu", save_at_end=False),
        train_data=_reader(files, shuffle=True, batch_size=TRAIN_BATCH),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        metrics={"auc": AUROC, "gauc": GAUC},
    )
    trainer.train()
    results = [
        trainer.evaluate(_reader(files, shuffle=False, batch_size=size)) for size in (7, 64, 256)
    ]
    model.eval()
    losses = {}
    with torch.no_grad():
        (batch,) = list(_reader(files, shuffle=False, batch_size=TRAIN_ROWS))
        out = model(batch)
    for task in ("click", "conv"):
        preds = out["predictions"][task].tolist()
        labels = out["labels"][task].tolist()
        users = (batch["user"] if task == "click" else out["groups"][task]).tolist()
        p = out["predictions"][task].double().clamp(1e-12, 1 - 1e-12)
        y = out["labels"][task].double()
        losses[task] = float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
        by_user: dict[int, list[tuple[float, float]]] = {}
        for pred, label, user in zip(preds, labels, users, strict=True):
            by_user.setdefault(user, []).append((pred, label))
        both = [rows for rows in by_user.values() if 0 < sum(y for _, y in rows) < len(rows)]
        gauc = sum(len(r) * _auc([p for p, _ in r], [y for _, y in r]) for r in both) / sum(
            len(r) for r in both
        )
        for got in results:
            assert got[f"{task}/auc"] == pytest.approx(_auc(preds, labels), abs=1e-12)
            assert got[f"{task}/gauc"] == pytest.approx(gauc, abs=1e-12)
            assert got[f"loss/{task}"] == pytest.approx(losses[task], rel=1e-5)
    for got in results:  # the weighted total, as trained: conv weighs 0.5
        assert got["loss"] == pytest.approx(losses["click"] + 0.5 * losses["conv"], rel=1e-5)


class _Crash(Hook):
    """Raises after step ``at``, as a preempted job stops (once: the first run only)."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer, logs: Any) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt(f"preempted after step {self.at}")


def _online_job(
    files: Sequence[Path], out: Path, crash_at: int | None = None
) -> tuple[list[WindowResult], dict[str, Any]]:
    """Windowed training over the files (one window each, the 0-row file included)."""
    model, dense, sparse = _build_model()
    online = Online(
        model,
        TrainingArguments(
            output_dir=str(out), gradient_accumulation_steps=2, device="cpu", deterministic=True
        ),
        [[str(f)] for f in files],
        lambda paths: _reader([Path(p) for p in paths], shuffle=True, batch_size=TRAIN_BATCH),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        hooks=[_Crash(crash_at)],
    )
    results = online.run()
    return results, _final_state(model, sparse, out)


def test_online_windows_of_reader_files_restart_and_export_loadable_deltas(
    tmp_path: Path,
) -> None:
    files = _training_files(tmp_path)  # 100, 0 and 156 rows: 4, 0 and 5 steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole, state = _online_job(files, tmp_path / "whole")
        with pytest.raises(KeyboardInterrupt, match="after step 6"):
            _online_job(files, tmp_path / "cut", crash_at=6)  # in the third window
        resumed, resumed_state = _online_job(files, tmp_path / "cut")
    finally:
        torch.set_num_threads(threads)

    assert [(w.index, w.step, w.train["samples"], w.export_kind) for w in whole] == [
        (0, 4, 100, "full"),
        (1, 4, 0, "delta"),
        (2, 9, 156, "delta"),
    ]
    assert whole[1].export_rows == 0
    assert whole[0].metrics == whole[1].metrics == {}  # untrained, then no rows
    assert {"click/auc", "conv/auc"} <= whole[2].metrics.keys()

    # The restart trained the third window again from the state after the second, and
    # reports every committed window as the uninterrupted run does.
    def summary(w: WindowResult) -> tuple[Any, ...]:
        train = {k: "nan" if math.isnan(v) else v for k, v in w.train.items()}  # no rows
        return (w.index, w.metrics, train, w.step, w.export_kind, w.export_rows)

    assert [summary(w) for w in resumed] == [summary(w) for w in whole]
    _assert_same_state(resumed_state, state)
    seen = torch.zeros(2, TRAIN_ROWS, dtype=torch.int64)
    seen[0] = 1
    assert torch.equal(state["dense"]["body.seen"], seen)  # every row once

    # The last export (full + two deltas) loads to the live tables, slots included.
    for run, windows in (("whole", whole), ("cut", resumed)):
        model, _, sparse = _build_model()
        assert windows[-1].export is not None
        emb.load(windows[-1].export, model, sparse)
        loaded = _final_state(model, sparse, tmp_path / f"loaded-{run}")
        assert loaded["tables"].keys() == state["tables"].keys()
        for table, tensors in state["tables"].items():
            for key, value in tensors.items():
                assert torch.equal(loaded["tables"][table][key], value), (run, table, key)


def _lines(stream: Any) -> Iterator[str]:
    for line in stream:
        yield line.strip()


def _main(argv: list[str]) -> None:
    data, out, result = Path(argv[0]), Path(argv[1]), Path(argv[2])
    pause_at = int(argv[4]) if len(argv) > 4 else None
    torch.set_num_threads(1)
    files = sorted(data.glob("train-*.parquet"))
    torch.save(_train_job(files, out, argv[3], pause_at), result)


if __name__ == "__main__":
    _main(sys.argv[1:])
