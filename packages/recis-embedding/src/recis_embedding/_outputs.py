"""Feature outputs from the deduplicated rows of one lookup: pooled, tiled, padded or ragged."""

from __future__ import annotations

from typing import Any

import torch

from recis_embedding._inputs import Ids
from recis_embedding._options import EmbeddingOption
from recis_embedding._pooling import bag_weights, padded_gather, pool
from recis_embedding.exceptions import InputError
from recis_kernels import RaggedTensor

__all__ = ["check_padded", "padded_output", "pooled_outputs"]


def pooled_outputs(
    option: EmbeddingOption,
    features: list[str],
    ids: list[Ids],
    inverse: torch.Tensor,
    emb: torch.Tensor,
    grouping: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Outputs of pooled ``features`` of one option, pooled by one reduce: ``(B, D)`` each
    (``(B, S, D)`` for 3-level ids). ``inverse`` maps their ids, laid end to end, to rows of
    ``emb``; ``grouping`` is the dedup's grouping when ``inverse`` is all of it."""
    mode = option.combiner or "sum"
    any_weights = option.use_weight and any(i.weights is not None for i in ids)
    singles = all(i.singles for i in ids) and not any_weights and option.combiner == "sum"
    weights: list[torch.Tensor | None] = []
    bags: list[torch.Tensor] = []
    counts: list[int] = []
    shift = 0
    for i in ids:
        n = i.values.numel()
        if not singles:
            w = i.weights if option.use_weight else None
            if w is None and any_weights and mode == "sum":
                w = torch.ones(n, device=emb.device)
            weights.append(bag_weights(i.bags, w, mode, n))
            bags.append(i.bags[:-1] + shift if shift else i.bags[:-1])
        counts.append(i.bags.numel() - 1)
        shift += n
    if singles:
        all_bags = torch.arange(shift + 1, device=emb.device)
        w_all = None
    else:
        all_bags = torch.cat([*bags, torch.tensor([shift], device=emb.device)])
        present = [w for w in weights if w is not None]
        w_all = torch.cat(present) if len(present) == len(weights) else None
    pooled = pool(emb, inverse, all_bags, w_all, singles, grouping)
    out = {}
    # Each feature's output is a view of its split part, an autograd node of its own: the
    # parts of one split node all receive a gradient (zeros for those the loss did not use),
    # and the engine tells which features the loss used by the gradients their outputs
    # receive. (Slices instead of the split would each send back a gradient of the whole.)
    parts = [p.view(p.shape) for p in torch.split(pooled, counts)]
    for f, i, p in zip(features, ids, parts, strict=True):
        if i.outer is not None:
            longest = int((i.outer[1:] - i.outer[:-1]).max()) if i.outer.numel() > 1 else 0
            p = padded_gather(p, torch.arange(p.shape[0], device=p.device), i.outer, longest)[0]
        out[f] = p
    return out


def padded_output(
    option: EmbeddingOption,
    feature: str,
    ids: Ids,
    inverse: torch.Tensor,
    emb: torch.Tensor,
) -> dict[str, Any]:
    """Output of a sequence (``combiner=None``) or ``tile`` feature: padded ``(B, L, D)`` with
    its ``"<feature>_mask"``, a ``RaggedTensor`` of rows, or ``(B, tile_len * D)``; ``ids``
    passed :func:`check_padded`."""
    kwargs = option.combiner_kwargs or {}
    lengths = ids.bags[1:] - ids.bags[:-1]
    if option.combiner == "tile":
        length = int(kwargs["tile_len"])
        values, _ = padded_gather(emb, inverse, ids.bags, length)
        return {feature: values.reshape(values.shape[0], length * emb.shape[1])}
    if kwargs.get("ragged"):
        rows = emb.index_select(0, inverse)
        return {feature: RaggedTensor(rows, ids.bags, validate=False)}
    max_len = kwargs.get("max_len")
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    values, mask = padded_gather(emb, inverse, ids.bags, int(max_len))
    return {feature: values, f"{feature}_mask": mask}


def check_padded(option: EmbeddingOption, feature: str, ids: Ids) -> None:
    """What :func:`padded_output` of ``feature`` would refuse in ``ids``, checked before the
    lookup (which inserts ids): 3-level ids, and a padded output too large to count.

    Raises:
        InputError: naming the feature (and the option that sizes the output).
    """
    if ids.outer is not None:
        raise InputError(
            f"feature {feature!r}: combiner {option.combiner!r} takes 2-level ids, got 3 levels"
        )
    kwargs = option.combiner_kwargs or {}
    name = "tile_len" if option.combiner == "tile" else "max_len"
    if kwargs.get(name) is not None:
        rows = ids.bags.numel() - 1
        _check_output_size(feature, name, rows, int(kwargs[name]), option.embedding_dim)


def _check_output_size(feature: str, option: str, rows: int, length: int, dim: int) -> None:
    """Refuses a padded ``(rows, length, dim)`` output whose element count int64 cannot hold
    (torch would fail unpacking the size, naming neither the feature nor the option)."""
    if rows * length * dim >= 1 << 63:
        raise InputError(
            f"feature {feature!r}: combiner_kwargs {option}={length} gives a padded output of "
            f"{rows} x {length} x {dim} elements for this batch, more than a tensor can hold"
        )
