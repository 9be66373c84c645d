"""The compiled CPU kernels (``recis_kernels._native``) against exact references and against the
ops' torch implementations, at sizes that share the work between threads, and their checks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import EXTREME_IDS, INT64_MAX
from test_feature_cross import pair_hash

import recis_kernels as rk
from recis_kernels import _native
from recis_kernels.ops import _cpu_kernels, _uint64, bucketize, mod

# Above twice the kernels' smallest share (1 << 17 elements): the work is split between threads.
_SHARED = 300_000


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def _random_ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-(1 << 63), INT64_MAX, (n,), generator=g, dtype=torch.int64)
    k = min(n, len(EXTREME_IDS))
    ids[:k] = torch.tensor(EXTREME_IDS[:k])
    return ids


def _umod_reference(ids: torch.Tensor, n: int) -> np.ndarray:
    return (ids.numpy().view(np.uint64) % np.uint64(n)).view(np.int64)


@pytest.mark.parametrize("threads", [1, 4])
def test_umod_parts_matches_unsigned_remainders(threads):
    sizes = [0, 1, 5, _SHARED // 2, 7, _SHARED // 3, 0]
    moduli = [3, 1, 2, (1 << 40) + 1, INT64_MAX, 1 << 33, 10]
    parts = [_random_ids(s, k) for k, s in enumerate(sizes)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _cpu_kernels.umod_parts(parts, moduli)
    finally:
        torch.set_num_threads(before)
    want = np.concatenate([_umod_reference(p, n) for p, n in zip(parts, moduli, strict=True)])
    np.testing.assert_array_equal(out.numpy(), want)


_M64 = np.uint64(0xC6A4A7935BD1E995)


def _pair_hash_reference(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """MurmurHash64A of each pair's 16 little-endian bytes in NumPy's unsigned arithmetic."""
    h = np.full(x.shape, np.uint64((16 * 0xC6A4A7935BD1E995) % (1 << 64)), dtype=np.uint64)
    for ids in (x.numpy().view(np.uint64), y.numpy().view(np.uint64)):
        k = ids * _M64
        k ^= k >> np.uint64(47)
        k *= _M64
        h ^= k
        h *= _M64
    h ^= h >> np.uint64(47)
    h *= _M64
    return (h ^ (h >> np.uint64(47))).view(np.int64)


def test_pair_hash_parts_match_murmur_of_the_pairs_bytes(four_threads):
    # Parts of every size, the long ones shared between threads across part boundaries.
    sizes = [0, 3, _SHARED // 2, 1, _SHARED // 3]
    xs = [_random_ids(n, 2 * k) for k, n in enumerate(sizes)]
    ys = [_random_ids(n, 2 * k + 1) for k, n in enumerate(sizes)]
    out = _cpu_kernels.pair_hash_flat(xs, ys)
    want = np.concatenate([_pair_hash_reference(x, y) for x, y in zip(xs, ys, strict=True)])
    np.testing.assert_array_equal(out.numpy(), want)
    # The Python definition of the hash agrees on the extremes.
    x, y = _random_ids(len(EXTREME_IDS), 5), _random_ids(len(EXTREME_IDS), 6).flip(0)
    got = _cpu_kernels.pair_hash_flat([x], [y]).tolist()
    assert got == [pair_hash(a, b) for a, b in zip(x.tolist(), y.tolist(), strict=True)]


def test_dense_crosses_read_strided_and_shaped_ids(four_threads):
    base = _random_ids(2 * _SHARED, 3)
    a, b = base[::2], base[1::2].flip(0)  # strided, and a negative stride
    crossed = rk.fused_feature_cross([(a, b), (b[:10], a[:10])])
    assert torch.equal(crossed[0].values, torch.from_numpy(_pair_hash_reference(a, b)))
    assert torch.equal(crossed[1].values, torch.from_numpy(_pair_hash_reference(b[:10], a[:10])))
    assert crossed[0].offsets[0].tolist() == list(range(_SHARED + 1))


def test_pair_hash_parts_reduce_each_part_by_its_divisor(four_threads):
    # Parts shared between threads across part boundaries, every divisor method (mask,
    # multiply, multiply with increment), 0 keeping the hashes whole.
    sizes = [3, _SHARED // 2, 0, 700, _SHARED // 3]
    ns = [7, 1 << 24, 5, 0, INT64_MAX]
    xs = [_random_ids(n, 2 * k) for k, n in enumerate(sizes)]
    ys = [_random_ids(n, 2 * k + 1) for k, n in enumerate(sizes)]
    out = _cpu_kernels.pair_hash_flat(xs, ys, ns)
    want = []
    for x, y, n in zip(xs, ys, ns, strict=True):
        h = torch.from_numpy(_pair_hash_reference(x, y))
        want.append(h.numpy() if n == 0 else _umod_reference(h, n))
    np.testing.assert_array_equal(out.numpy(), np.concatenate(want))
    x = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="pair_hash_parts: got 1 parts but 2 divisors"):
        _native.pair_hash_parts([(x.data_ptr(), 4)], [(x.data_ptr(), 4)], x.data_ptr(), 1, [3, 4])
    with pytest.raises(
        ValueError, match=r"pair_hash_parts: divisors\[0\] = 9223372036854775808 is not 0"
    ):
        _native.pair_hash_parts(
            [(x.data_ptr(), 4)], [(x.data_ptr(), 4)], x.data_ptr(), 1, [1 << 63]
        )


def test_host_spans_read_plain_host_tensors_in_place():
    a, b = torch.arange(6), torch.arange(12).view(3, 4).t()  # 1-d; 2-d and strided
    spans = _cpu_kernels.host_spans([a, a], torch.int64)
    assert spans is not None
    assert spans.shapes is None
    assert spans.spans == [(a.data_ptr(), 6)] * 2
    assert spans.sizes == [6, 6]
    spans = _cpu_kernels.host_spans([a, b], torch.int64)
    assert spans is not None
    assert spans.shapes == [a.shape, b.shape]
    assert torch.equal(spans.keep[1], b.reshape(-1))  # a contiguous copy, kept for the call
    parts = _cpu_kernels.split_spans(torch.cat(spans.keep), spans)
    assert torch.equal(parts[0], a)
    assert torch.equal(parts[1], b)
    for bad in (a.float(), [1, 2], a.to(torch.int32), a.to("meta")):
        assert _cpu_kernels.host_spans([a, bad], torch.int64) is None
    w = torch.ones(3)
    assert _cpu_kernels.host_spans([w], torch.float32) is not None
    assert _cpu_kernels.host_spans([w.requires_grad_()], torch.float32) is None


def test_pair_hash_parts_refuses_mismatched_parts():
    x = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="pair_hash_parts: got 1 a parts but 2 b parts"):
        _native.pair_hash_parts([(x.data_ptr(), 4)], [(x.data_ptr(), 4)] * 2, x.data_ptr(), 1)
    with pytest.raises(ValueError, match="pair_hash_parts: part 0 has 4 a ids but 3 b ids"):
        _native.pair_hash_parts([(x.data_ptr(), 4)], [(x.data_ptr(), 3)], x.data_ptr(), 1)


def test_fused_mod_reads_strided_and_shaped_inputs(four_threads):
    base = _random_ids(2 * _SHARED, 1)
    strided = base[::2]
    shaped = base[:600].view(20, 30).t()  # not contiguous
    outs = rk.fused_mod([strided, shaped], [1_000_003, 97])
    assert outs[1].shape == shaped.shape
    np.testing.assert_array_equal(outs[0].numpy(), _umod_reference(strided.contiguous(), 1_000_003))
    np.testing.assert_array_equal(
        outs[1].reshape(-1).numpy(), _umod_reference(shaped.reshape(-1), 97)
    )


def test_fused_mod_kernel_and_torch_implementation_agree(monkeypatch):
    ids = [_random_ids(1000, 2), _random_ids(333, 3)]
    moduli = [7, (1 << 62) + 3]
    kernel = rk.fused_mod(ids, moduli)
    # Without value access (as while tracing), fused_mod runs its torch implementation.
    monkeypatch.setattr(_cpu_kernels, "on_host", lambda tensors: False)
    monkeypatch.setattr(mod, "can_inspect", lambda t: False)
    monkeypatch.setattr(_uint64, "can_inspect", lambda t: False)
    torch_impl = rk.fused_mod(ids, moduli)
    for a, b in zip(kernel, torch_impl, strict=True):
        assert torch.equal(a, b)


def _values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        x = torch.randint(-1000, 1000, (n,), generator=g)
        x[:2] = torch.tensor([-(1 << 63), INT64_MAX])
        return x
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 40).to(dtype)
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0]
    x[: min(n, 5)] = torch.tensor(specials[: min(n, 5)], dtype=dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_fused_bucketize_kernel_short_and_long_lists(dtype, four_threads):
    # Short lists are counted, lists over 32 binary searched; repeats and an empty list too.
    lists = [
        sorted(float(v) for v in np.linspace(-50, 50, 9)),
        sorted(float(v) for v in np.repeat(np.linspace(-100, 100, 40), 2)),
        [],
        [0.0, 0.0, 0.0],
    ]
    if dtype == torch.int64:
        lists = [[int(v) for v in b] for b in lists]
    xs = [_values(dtype, n, k) for k, n in enumerate([_SHARED // 2, _SHARED // 2, 100, 3000])]
    outs = rk.fused_bucketize(xs, lists)
    for x, b, out in zip(xs, lists, outs, strict=True):
        if dtype.is_floating_point:  # exact: every float32 and the boundaries are float64s
            want = torch.searchsorted(torch.tensor(b, dtype=torch.float64), x.double(), right=True)
            want = torch.where(x.isnan(), 0, want)
        else:
            want = torch.searchsorted(torch.tensor(b, dtype=dtype), x, right=True)
        assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_fused_bucketize_kernel_and_torch_implementation_agree(dtype, monkeypatch):
    lists = [[-3, 0, 2.5, 10], [float(v) for v in np.linspace(-90, 90, 50)]]
    xs = [_values(dtype, 2000, 5), _values(dtype, 2000, 6)[::2]]
    kernel = rk.fused_bucketize(xs, lists)
    monkeypatch.setattr(bucketize, "on_host", lambda tensors: False)
    monkeypatch.setattr(bucketize, "can_inspect", lambda t: False)
    torch_impl = rk.fused_bucketize(xs, lists)
    for a, b in zip(kernel, torch_impl, strict=True):
        assert torch.equal(a, b)


def test_kernel_checks_name_what_is_wrong():
    x = torch.arange(8, dtype=torch.int64)
    out = torch.empty(8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"umod_parts: divisors\[0\] = 0 is not in"):
        _native.umod_parts([(x.data_ptr(), 8)], [0], out.data_ptr(), 1)
    with pytest.raises(ValueError, match="umod_parts: got 1 parts but 2 divisors"):
        _native.umod_parts([(x.data_ptr(), 8)], [3, 4], out.data_ptr(), 1)
    with pytest.raises(ValueError, match=r"umod_parts: parts\[0\] has address .* not aligned"):
        _native.umod_parts([(x.data_ptr() + 1, 4)], [3], out.data_ptr(), 1)
    with pytest.raises(ValueError, match="umod_parts: out has address 0x0, null"):
        _native.umod_parts([(x.data_ptr(), 8)], [3], 0, 1)
    with pytest.raises(ValueError, match="bucketize_parts: dtype must be float32, float64 or"):
        _native.bucketize_parts("int32", [(x.data_ptr(), 8)], x.data_ptr(), [1], out.data_ptr(), 1)
    with pytest.raises(ValueError, match="bucketize_parts: got 1 parts but 0 boundary lists"):
        _native.bucketize_parts("int64", [(x.data_ptr(), 8)], x.data_ptr(), [], out.data_ptr(), 1)
    # Empty parts need no memory at all.
    _native.umod_parts([(0, 0)], [3], 0, 1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bfloat16, torch.bool])
def test_truncate_copies_rows_of_any_dtype_and_width(dtype, four_threads):
    # Rows long enough for several threads; 2-d values (8 columns) and weights follow along.
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 400, (3000,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    values = torch.randint(0, 2, (n, 8), generator=g).to(dtype)
    weights = torch.rand(n, generator=g)
    r = rk.RaggedTensor(values, offsets, weights)
    for side in ("head", "tail"):
        got = rk.truncate(r, 150, side).values
        rows = [
            (values[a:b], weights[a:b])
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
        ]
        keep = [(v[:150], w[:150]) if side == "head" else (v[-150:], w[-150:]) for v, w in rows]
        keep = [(v, w) if v.shape[0] else (v[:0], w[:0]) for v, w in keep]
        assert torch.equal(got.values, torch.cat([v for v, _ in keep]))
        assert torch.equal(got.weights, torch.cat([w for _, w in keep]))
        assert got.lengths().tolist() == [min(int(x), 150) for x in lengths]


def _copy_rows(src, starts, offsets):
    offsets = torch.tensor(offsets)
    return _cpu_kernels.copy_rows(src, torch.tensor(starts), offsets, int(offsets[-1]))


def test_copy_rows_refuses_ranges_outside_the_buffers():
    src = torch.arange(10, dtype=torch.int64)
    with pytest.raises(
        ValueError, match=r"copy_rows: row 1 copies items 8\.\.12 of 10 into 2\.\.6"
    ):
        _copy_rows(src, [0, 8], [0, 2, 6])
    with pytest.raises(ValueError, match=r"copy_rows: row 0 copies items -1\.\.1 of 10"):
        _copy_rows(src, [-1], [0, 2])
    # Offsets that step down are refused too.
    with pytest.raises(
        ValueError, match=r"copy_rows: row 1 copies items 0\.\.0 of 10 into 3\.\.2 of 4"
    ):
        _copy_rows(src, [0, 0, 0], [0, 3, 2, 4])
    out = _copy_rows(src, [7, 0, 3], [0, 2, 2, 5])
    assert out.tolist() == [7, 8, 3, 4, 5]


def test_background_row_copies_check_first_and_finish_on_wait():
    src = torch.arange(10, dtype=torch.int64)
    starts, offsets = torch.tensor([7, 0, 3]), torch.tensor([0, 2, 2, 5])
    out = torch.zeros(5, dtype=torch.int64)
    args = (src.data_ptr(), 10, out.data_ptr(), 5, 8, starts.data_ptr(), offsets.data_ptr(), 3, 1)
    job = _native.copy_rows(*args, True)
    assert job is not None
    job.wait()
    assert job.done
    assert out.tolist() == [7, 8, 3, 4, 5]
    assert _native.copy_rows(*args) is None  # in place
    # A bad range raises before anything starts.
    bad = torch.tensor([9, 0, 3])
    with pytest.raises(ValueError, match=r"copy_rows: row 0 copies items 9\.\.11"):
        _native.copy_rows(*args[:5], bad.data_ptr(), *args[6:], True)
    # Dropping a running copy waits for it (the buffers stay valid meanwhile).
    big = torch.arange(1 << 20, dtype=torch.int64)
    dst = torch.empty_like(big)
    one, ends = torch.tensor([0]), torch.tensor([0, 1 << 20])
    job = _native.copy_rows(
        big.data_ptr(), 1 << 20, dst.data_ptr(), 1 << 20, 8, one.data_ptr(), ends.data_ptr(), 1, 1,
        True,
    )  # fmt: skip
    del job
    assert torch.equal(dst, big)


def test_truncate_plan_gives_each_rows_kept_range():
    # Part 0: three rows kept to 2 from the head; part 1: two rows kept to 3 from the tail.
    offsets = torch.tensor([0, 3, 3, 8, 9, 14])
    total, new_off, starts, dropped, padded = _cpu_kernels.truncate_plan(
        offsets, [(3, 2, False), (2, 3, True)]
    )
    assert total == 8
    assert new_off.tolist() == [0, 2, 2, 4, 5, 8]
    assert starts.tolist() == [0, 3, 3, 8, 11]
    assert dropped.tolist() == [1, 0, 3, 0, 2]
    assert padded.tolist() == [0, 2, 0, 2, 0]
    with pytest.raises(ValueError, match="truncate_plan: the parts' rows do not add up to 5"):
        _cpu_kernels.truncate_plan(offsets, [(3, 2, False)])
    with pytest.raises(ValueError, match="truncate_plan: a max_len is negative"):
        _cpu_kernels.truncate_plan(offsets, [(5, -1, False)])


FORK_CHILD = """
import os, torch
import recis_kernels as rk

torch.set_num_threads(2)
ids = torch.arange(1 << 20, dtype=torch.int64)
rk.fused_mod([ids], [7])  # shared between threads: the parent's pool starts
pid = os.fork()
if pid == 0:
    out = rk.fused_mod([ids], [7])[0]
    os._exit(0 if int(out[-1]) == ((1 << 20) - 1) % 7 else 3)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_shares_work_between_threads_of_its_own():
    # The child inherits the parent's thread pool without its threads: handing work to them
    # waited forever.
    result = subprocess.run(
        [sys.executable, "-c", FORK_CHILD], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
