"""Owner ranks and id mixing refuse what they would get wrong; clear to_dense length errors."""

from __future__ import annotations

import pytest
import torch
from hash_reference import fmix64 as _fmix64_ref

from recis_kernels import (
    IdMap,
    RaggedError,
    RaggedTensor,
    ShapeError,
    UnsupportedDtypeError,
    fmix64,
    owner_rank,
    partition_ids,
    truncate,
)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_owner_rank_and_fmix64_refuse_narrow_ids(dtype: torch.dtype) -> None:
    # A narrower dtype used to be mixed as short words: id 5 as int32 got another owner than
    # id 5 as int64, silently.
    ids = torch.tensor([5, 7], dtype=dtype)
    with pytest.raises(UnsupportedDtypeError, match="owner_rank: ids has dtype"):
        owner_rank(ids, 7)
    with pytest.raises(UnsupportedDtypeError, match="fmix64: x has dtype"):
        fmix64(ids)


@pytest.mark.parametrize("world_size", [0, -3, 2.5, True, "4"])
def test_owner_rank_and_partition_refuse_bad_world_sizes(world_size: object) -> None:
    ids = torch.tensor([1, -1])
    with pytest.raises(ShapeError, match="owner_rank: world_size must be"):
        owner_rank(ids, world_size)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="partition_ids: world_size must be"):
        partition_ids(ids, world_size)  # type: ignore[arg-type]


def test_owner_rank_keeps_shape_and_matches_the_unsigned_reference() -> None:
    ids = torch.tensor([[0, -1, -(1 << 63)], [(1 << 63) - 1, 12345, -2]])
    for w in (1, 3, 1000003, (1 << 62) + 1):
        got = owner_rank(ids, w)
        assert got.shape == ids.shape
        assert got.flatten().tolist() == [_fmix64_ref(v) % w for v in ids.flatten().tolist()]


def test_owner_rank_compiles_into_one_graph() -> None:
    ids = torch.tensor([0, -1, -(1 << 63), (1 << 63) - 1, 12345])
    compiled = torch.compile(lambda x: owner_rank(x, 3), backend="eager", fullgraph=True)
    assert compiled(ids).tolist() == [_fmix64_ref(v) % 3 for v in ids.tolist()]


def test_to_dense_names_a_bad_number_of_lengths() -> None:
    two = RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]))
    with pytest.raises(RaggedError) as info:
        two.to_dense(max_len=(1, 2))
    assert str(info.value) == (
        "to_dense: max_len of a 2-level ragged tensor must be an int or one length (L), "
        "got 2 lengths"
    )
    with pytest.raises(RaggedError, match="got 0 lengths"):
        two.to_dense(max_len=())
    three = RaggedTensor(torch.arange(3), [torch.tensor([0, 2]), torch.tensor([0, 1, 3])])
    with pytest.raises(RaggedError, match="one or two lengths"):
        three.to_dense(max_len=(1, 2, 3))
    assert three.to_dense(pad_value=-1, max_len=[1]).tolist() == [[[0], [1]]]
    assert two.to_dense(pad_value=-1, max_len=[1]).tolist() == [[1], [3]]


@pytest.mark.parametrize(
    ("dtype", "pad", "held"),
    [
        (
            torch.int64,
            0.5,
            "int64 values (integers in [-9223372036854775808, 9223372036854775807])",
        ),
        (torch.int32, 2**40, "int32 values (integers in [-2147483648, 2147483647])"),
        (torch.int32, float("nan"), "int32 values (integers in [-2147483648, 2147483647])"),
        (torch.uint8, -1, "uint8 values (integers in [0, 255])"),
        (torch.bool, 2, "bool values (integers in [0, 1])"),
    ],
)
def test_to_dense_refuses_a_pad_the_values_cannot_hold(
    dtype: torch.dtype, pad: float, held: str
) -> None:
    # 0.5 used to pad int64 ids as 0 and -1 padded uint8 as 255: padding equal to real values.
    r = RaggedTensor(torch.tensor([1, 0, 1], dtype=dtype), torch.tensor([0, 2, 3]))
    with pytest.raises(RaggedError) as info:
        r.to_dense(pad_value=pad)
    assert str(info.value) == f"ragged_to_dense: pad_value {pad!r} cannot be held exactly by {held}"


def test_to_dense_takes_every_pad_the_values_hold() -> None:
    ids = RaggedTensor(torch.tensor([7, 8, 9]), torch.tensor([0, 2, 3]))
    assert ids.to_dense(pad_value=-1).tolist() == [[7, 8], [9, -1]]
    assert ids.to_dense(pad_value=3.0).tolist() == [[7, 8], [9, 3]]
    assert ids.to_dense(pad_value=-(2**63)).tolist() == [[7, 8], [9, -(2**63)]]
    small = RaggedTensor(torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([0, 2, 3]))
    assert small.to_dense(pad_value=255).tolist() == [[1, 2], [3, 255]]
    flags = RaggedTensor(torch.tensor([True, True, False]), torch.tensor([0, 2, 3]))
    assert flags.to_dense(pad_value=False).tolist() == [[True, True], [False, False]]
    floats = RaggedTensor(torch.tensor([0.5, 1.5, 2.5]), torch.tensor([0, 2, 3]))
    assert floats.to_dense(pad_value=float("nan"))[1, 1].isnan()
    assert floats.to_dense(pad_value=-0.25).tolist() == [[0.5, 1.5], [2.5, -0.25]]


def _compiled(fn):  # type: ignore[no-untyped-def]
    """``fn`` compiled into one graph, data-dependent sizes captured (no host round trip)."""
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)


@torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
def test_three_level_truncate_compiles_into_one_graph() -> None:
    r = RaggedTensor(
        torch.tensor([1, 2, 3, 4, 5]),
        [torch.tensor([0, 3, 3, 4]), torch.tensor([0, 1, 3, 3, 5])],
        weights=torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]),
    )

    def run(r: RaggedTensor, max_len: int, side: str) -> tuple[torch.Tensor, ...]:
        out = truncate(r, max_len, side)
        v = out.values
        return v.values, v.offsets[0], v.offsets[1], v.weights, out.dropped, out.padded

    for max_len, side in ((2, "tail"), (1, "head"), (0, "head")):
        eager = run(r, max_len, side)
        got = _compiled(run)(r, max_len, side)
        for g, e in zip(got, eager, strict=True):
            assert torch.equal(g, e)
    # rows [[[1], [2, 3], []], [], [[4, 5]]], the last 2 sub-rows kept, padded with empty ones
    assert [t.tolist() for t in run(r, 2, "tail")[:3]] == [
        [2, 3, 4, 5],
        [0, 2, 4, 6],
        [0, 2, 2, 2, 2, 4, 4],
    ]


@torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
def test_to_dense_with_the_longest_rows_compiles_into_one_graph() -> None:
    two = RaggedTensor(torch.tensor([7, 8, 9]), torch.tensor([0, 2, 2, 3]))
    three = RaggedTensor(torch.arange(4), [torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 3, 4])])
    for r in (two, three):
        eager = r.to_dense(pad_value=-1)
        assert torch.equal(_compiled(lambda r: r.to_dense(pad_value=-1))(r), eager)
    assert three.to_dense(pad_value=-1).tolist() == [
        [[0, 1], [2, -1]],
        [[-1, -1], [-1, -1]],
        [[3, -1], [-1, -1]],
    ]


def test_repeated_new_ids_do_not_grow_the_id_map() -> None:
    # The map reserved room for every occurrence of a new id: 3 new ids repeated 100000 times
    # took 2**20 slots for 3 live keys.
    m = IdMap(capacity=16)
    rows, is_new = m.find_or_insert(torch.tensor([1, 2, 3]).repeat(100_000))
    assert (m.size, m.capacity) == (3, 16)
    assert rows[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert bool(is_new.all())
    absent = IdMap(capacity=16)
    assert absent.insert_absent(torch.tensor([7, -1, 7, -1] * 1000), 2)[:4].tolist() == [0, 1, 0, 1]
    assert (absent.size, absent.capacity) == (2, 16)
    # Growth still follows the distinct keys: 8 fit in 16 slots, the 9th doubles the map.
    m = IdMap(capacity=16)
    first, _ = m.find_or_insert(torch.arange(8).repeat(50))
    assert m.capacity == 16
    assert sorted(first[:8].tolist()) == list(range(8))
    m.find_or_insert(torch.tensor([100] * 50))
    assert (m.size, m.capacity) == (9, 32)
    assert m.find(torch.arange(8)).tolist() == first[:8].tolist()
    assert m.find(torch.tensor([100])).tolist() == [8]


# -- integer parameters given as NumPy scalars --------------------------------------------------


def test_numpy_integer_parameters_act_as_python_ints() -> None:
    # Vocabulary sizes and lengths often come out of NumPy (``arr.max() + 1``); each op gives
    # what it gives for the Python int.
    np = pytest.importorskip("numpy")
    import recis_kernels as rk

    ids = torch.tensor([7, -1, 123456789])
    r = RaggedTensor(torch.arange(5), [torch.tensor([0, 2, 5])])
    rows = torch.arange(10, dtype=torch.float32).view(5, 2)
    offsets = torch.tensor([0, 2, 5])
    pairs = [
        (lambda n: rk.mod(ids, n), 10),
        (lambda n: rk.fused_mod([ids, ids[:1]], [n, n])[0], 10),
        (lambda n: rk.hash_strings(["a", "bc"], buckets=n), 100),
        (lambda n: rk.multi_hash(ids, [n, n + 1]), 1000),
        (lambda n: rk.truncate(r, n, "tail").values.values, 1),
        (lambda n: rk.fused_truncate([r], [n], ["head"])[0].values.values, 1),
        (lambda n: r.to_dense(max_len=n), 2),
        (lambda n: rk.segment_reduce(rows, offsets, None, "tile", n), 1),
        (lambda n: rk.IdMap().find_or_insert(ids, n)[0], 3),
    ]
    for op, n in pairs:
        for kind in (np.int64, np.int32, np.uint16):
            assert torch.equal(op(kind(n)), op(n)), (op, kind)


def test_numpy_bools_are_not_integer_parameters() -> None:
    np = pytest.importorskip("numpy")
    import recis_kernels as rk

    with pytest.raises(ValueError, match=r"mod: n must be an int in \[1, 2\*\*63 - 1\], got"):
        rk.mod(torch.tensor([1]), np.True_)
    with pytest.raises(ValueError, match=r"multi_hash: buckets\[0\] must be an int"):
        rk.multi_hash(torch.tensor([1]), [np.True_])


def test_bad_argument_values_raise_the_package_s_own_errors() -> None:
    # Each is also the builtin it used to be (ValueError / TypeError), so old handlers work.
    import recis_kernels as rk
    from recis_kernels import ArgumentError, RecisKernelsError

    ids = torch.tensor([1, 2])
    data = torch.tensor([97], dtype=torch.uint8)
    cases = [
        (lambda: rk.mod(ids, 0), ArgumentError, r"mod: n must be an int in \[1, 2\*\*63 - 1\]"),
        (lambda: rk.fused_mod([ids], [3, 4]), ArgumentError, "1 id tensors but 2 moduli"),
        (lambda: rk.multi_hash(ids, []), ArgumentError, "at least one hash"),
        (
            lambda: rk.truncate(RaggedTensor(ids, torch.tensor([0, 2])), 1, "middle"),
            ArgumentError,
            "side",
        ),
        (lambda: rk.hash_bytes(data, torch.tensor([0, 1]), "sha1"), ArgumentError, "algorithm"),
        (lambda: rk.hash_strings([1]), UnsupportedDtypeError, "strings must be str or bytes"),
        (lambda: rk.compile_kernel("mod", "90"), ArgumentError, "arch must look like 'sm_90'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as info:
            call()
        assert isinstance(info.value, RecisKernelsError)
        builtin = TypeError if error is UnsupportedDtypeError else ValueError
        assert isinstance(info.value, builtin)
