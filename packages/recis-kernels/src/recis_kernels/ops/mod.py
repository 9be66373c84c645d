"""``mod`` / ``fused_mod``: unsigned 64-bit remainder of int64 ids.

Ids are 64-bit patterns: ``-1`` is ``2**64 - 1``, so ``mod(tensor([-1]), 10)`` is ``5``
(``18446744073709551615 % 10``). This matches hashing pipelines that treat ids as ``uint64``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, TypeGuard  # noqa: UP035  (torch 2.6 infers schemas from typing.List only)

import torch

from recis_kernels._backend import run_op, use_cuda_kernels
from recis_kernels._checks import (
    can_inspect,
    check_dtype,
    check_parts,
    check_same_device,
    check_tensor,
    common_device,
    grid_for,
    is_int,
)
from recis_kernels.exceptions import ArgumentError, ShapeError
from recis_kernels.ops import _cpu_kernels
from recis_kernels.ops._packing import pack, unpack
from recis_kernels.ops._uint64 import umod, umod_segments

__all__ = ["fused_mod", "mod"]

_OP = "mod"
_INT64_MAX = (1 << 63) - 1


def _valid_n(n: object) -> TypeGuard[int]:
    return is_int(n) and 0 < n <= _INT64_MAX


def _check_n(op: str, where: str, n: object) -> int:
    if not _valid_n(n):
        raise ArgumentError(f"{op}: {where} must be an int in [1, 2**63 - 1], got {n!r}")
    return int(n)


def mod(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Unsigned 64-bit remainder ``(uint64)ids % n``.

    Args:
        ids: int64 tensor of any shape.
        n: modulus in ``[1, 2**63 - 1]``.

    Returns:
        int64 tensor shaped like ``ids`` with values in ``[0, n)``.

    Raises:
        UnsupportedDtypeError: ``ids`` is not int64.
        ArgumentError: ``n`` out of range.

    Example:
        >>> mod(torch.tensor([7, -1]), 10)
        tensor([7, 5])
    """
    if type(n) is int and 0 < n <= _INT64_MAX:
        # A plain CPU int64 tensor goes straight to the compiled kernel, as fused_mod's do.
        spans = _cpu_kernels.host_spans([ids], torch.int64)
        if spans is not None and not use_cuda_kernels(ids.device):
            return _cpu_kernels.umod_spans(spans, [n])[0]
    check_tensor(_OP, "ids", ids)
    check_dtype(_OP, "ids", ids, (torch.int64,))
    n = _check_n(_OP, "n", n)
    return run_op(_fused_mod_op, _fused_mod_impl, ids.reshape(-1), [ids.numel()], [n]).view(
        ids.shape
    )


def fused_mod(ids_list: Sequence[torch.Tensor], ns: Sequence[int]) -> list[torch.Tensor]:
    """:func:`mod` over several features in one pass (one kernel launch on CUDA).

    Args:
        ids_list: K int64 tensors of any shapes, on one device.
        ns: K moduli, ``ns[k]`` for ``ids_list[k]``.

    Returns:
        K int64 tensors shaped like the inputs.
    """
    op = "fused_mod"
    if len(ids_list) != len(ns):
        raise ArgumentError(f"{op}: got {len(ids_list)} id tensors but {len(ns)} moduli")
    if not ids_list:
        return []
    # Plain CPU int64 tensors go straight to the compiled kernel (each feature reduced from its
    # own memory into its part of one output: no packed copy of the inputs); with Python int
    # moduli in range, as is usual, without the checks below.
    spans = _cpu_kernels.host_spans(ids_list, torch.int64)
    host = spans is not None and not use_cuda_kernels(ids_list[0].device)
    if host and type(ns) is list and all(type(n) is int and 0 < n <= _INT64_MAX for n in ns):
        return _cpu_kernels.umod_spans(spans, ns)  # type: ignore[arg-type]
    if not all(_valid_n(n) for n in ns) or common_device(ids_list, (torch.int64,)) is None:
        for k, ids in enumerate(ids_list):
            check_tensor(op, f"ids_list[{k}]", ids)
            check_dtype(op, f"ids_list[{k}]", ids, (torch.int64,))
            _check_n(op, f"ns[{k}]", ns[k])
        check_same_device(op, {f"ids_list[{k}]": t for k, t in enumerate(ids_list)})
    ns = [int(n) for n in ns]  # NumPy integers as Python ints, for the op schema
    if host:
        return _cpu_kernels.umod_spans(spans, ns)  # type: ignore[arg-type]
    packed, sizes = pack(ids_list)
    out = run_op(_fused_mod_op, _fused_mod_impl, packed, sizes, list(ns))
    return unpack(out, sizes, [t.shape for t in ids_list])


def _fused_mod_cpu(ids: torch.Tensor, sizes: list[int], ns: list[int]) -> torch.Tensor:
    # The torch implementation; it also runs on CUDA tensors when the kernels are not used.
    if can_inspect(ids):
        return umod_segments(ids, sizes, ns)
    if len(ns) == 1:
        return umod(ids, ns[0], (1 << 64) % ns[0])
    n = torch.tensor(ns, dtype=torch.int64, device=ids.device)
    c = torch.tensor([(1 << 64) % v for v in ns], device=ids.device)
    if len(set(sizes)) == 1:
        # Equal-sized features (one batch): broadcast per-feature moduli over a (K, B) view
        # instead of materializing per-element parameters.
        return umod(ids.view(len(sizes), -1), n[:, None], c[:, None]).view(-1)
    counts = torch.tensor(sizes, device=ids.device)
    return umod(ids, n.repeat_interleave(counts), c.repeat_interleave(counts))


def _fused_mod_cuda(ids: torch.Tensor, sizes: list[int], ns: list[int]) -> torch.Tensor:
    from recis_kernels._cuda import launch

    out = torch.empty_like(ids)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    feature_offsets = torch.tensor(bounds, dtype=torch.int64, device=ids.device)
    ns_t = torch.tensor(ns, dtype=torch.int64, device=ids.device)
    n = ids.numel()
    launch(
        "mod", "fused_mod", grid_for(n), 256,
        [("ptr", ids), ("ptr", feature_offsets), ("ptr", ns_t), ("i64", len(ns)), ("i64", n),
         ("ptr", out)],
        device=ids.device,
    )  # fmt: skip
    return out


def _fused_mod_impl(ids: torch.Tensor, sizes: List[int], ns: List[int]) -> torch.Tensor:  # noqa: UP006
    ids = ids.contiguous()
    if len(ns) != len(sizes):
        raise ShapeError(f"fused_mod: {len(sizes)} id parts but {len(ns)} moduli")
    check_parts("fused_mod", "sizes", sizes, ids.numel(), "ids")
    if use_cuda_kernels(ids.device):
        return _fused_mod_cuda(ids, sizes, ns)
    return _fused_mod_cpu(ids, sizes, ns)


_fused_mod_op = torch.library.custom_op("recis::fused_mod", mutates_args=())(_fused_mod_impl)


@_fused_mod_op.register_fake
def _(ids: torch.Tensor, sizes: list[int], ns: list[int]) -> torch.Tensor:
    return torch.empty_like(ids)
