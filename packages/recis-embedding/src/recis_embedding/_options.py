"""``EmbeddingOption``: how one feature is embedded, and which options fuse."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

from recis_embedding._initializers import Initializer, TruncatedNormal
from recis_embedding._numbers import default_value_error, plain
from recis_embedding._policies import AdmissionPolicy, CapacityEviction, EvictionPolicy, policy_key
from recis_embedding.exceptions import ConfigError
from recis_kernels.ops.hash_table import MAX_LOAD_FACTOR, check_load_factor

__all__ = ["COMBINERS", "EmbeddingOption"]

COMBINERS = ("sum", "mean", "sqrtn", "tile", None)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(eq=False)
class EmbeddingOption:
    """How one feature is embedded.

    Args:
        embedding_dim: columns per embedding vector.
        shared_name: table name; features with the same ``shared_name`` share one table. Default:
            the feature name.
        combiner: ``"sum"``, ``"mean"`` (``Σw·e / Σw``), ``"sqrtn"`` (``Σw·e / sqrt(Σw²)``),
            ``"tile"`` (first ``tile_len`` ids of each row side by side, zero-padded:
            ``(B, tile_len * dim)``) or ``None`` for a sequence output ``(B, L, dim)``.
        combiner_kwargs: ``{"tile_len": L}`` for ``"tile"``; for ``combiner=None``,
            ``{"max_len": L}`` fixes the padded length (default: the longest row of the batch)
            and ``{"ragged": True}`` returns a ``RaggedTensor`` of ``(N, dim)`` rows instead.
            A row's ids past ``tile_len`` or ``max_len`` are dropped before the lookup: they
            are never inserted, counted by admission or trained.
        initializer: seeded per-id initializer (default ``TruncatedNormal(std=0.01)``).
        dtype: storage dtype of the embeddings: float32, bfloat16 or float16 (optimizer math is
            float32 in every case).
        device: where the table lives (default CPU). Tables are not parameters: moving the
            module (``.to(device)``, ``.cuda()``, ``.cpu()``) to another device raises
            :class:`~recis_embedding.ConfigError` naming the tables, and dtype casts
            (``.half()``, ``.double()``, ``.to(torch.bfloat16)``) leave them in ``dtype``.
        trainable: whether the table trains. ``False`` freezes it (e.g. pretrained
            embeddings): lookups insert nothing, in training as in ``eval()`` mode (unseen ids
            read ``default_value``), the table is left out of
            :func:`~recis_embedding.sparse_parameters` and of autograd, its rows and eviction
            statistics never change, and delta checkpoints hold none of its rows. A frozen
            table takes no ``admission`` (except ``ReadOnlyAdmission()``) and no
            ``eviction``: the engine raises :class:`~recis_embedding.ConfigError`.
        use_weight: whether per-id weights of a ragged input scale the pooling (``False``:
            every id counts 1).
        admission: admission policy (default: admit every id).
        eviction: eviction policy (default: never evict).
        capacity: maximum rows of the table (default unbounded; of each rank's shard when the
            engine is sharded). A full table with no eviction policy raises
            :class:`~recis_embedding.TableFullError`.
        default_value: what an id that is not (yet) in the table reads in ``eval()`` mode,
            in a frozen table, or while admission holds it back.
        max_load_factor: how full the table's id map may get before it doubles, in
            ``(0, 0.9]``. 0.5 (the default) keeps probes short; 0.75 needs a third less map
            memory per id (21 bytes a slot), for very large tables.

    Tables of options with equal *storage* properties (dim, dtype, device, trainable,
    admission, eviction, default value, max load factor) and no ``capacity`` are fused into one
    physical table (a table with a ``capacity`` keeps its own, so the bound is its own); lookups
    with equal *runtime* properties (combiner and its kwargs, use_weight) are served by one
    reduce.
    """

    embedding_dim: int
    _: KW_ONLY
    shared_name: str | None = None
    combiner: str | None = "sum"
    combiner_kwargs: dict[str, Any] | None = None
    initializer: Initializer = field(default_factory=lambda: TruncatedNormal(std=0.01))
    dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None
    trainable: bool = True
    use_weight: bool = True
    admission: Any = None
    eviction: Any = None
    capacity: int | None = None
    default_value: float = 0.0
    max_load_factor: float = MAX_LOAD_FACTOR

    def __post_init__(self) -> None:
        self._plain_numbers()
        if not _positive_int(self.embedding_dim):
            raise ConfigError(f"embedding_dim must be a positive int, got {self.embedding_dim!r}")
        if self.combiner not in COMBINERS:
            raise ConfigError(
                f"combiner must be one of 'sum', 'mean', 'sqrtn', 'tile' or None, got "
                f"{self.combiner!r}"
            )
        kwargs = dict(self.combiner_kwargs or {})
        allowed = {"tile": {"tile_len"}, None: {"max_len", "ragged"}}.get(self.combiner, set())
        unknown = set(kwargs) - allowed
        if unknown:
            raise ConfigError(
                f"combiner_kwargs {sorted(unknown)} not accepted by combiner {self.combiner!r}"
            )
        if self.combiner == "tile" and not _positive_int(kwargs.get("tile_len")):
            raise ConfigError(
                f"combiner 'tile' needs combiner_kwargs={{'tile_len': L}} with an int L >= 1, got "
                f"{kwargs.get('tile_len')!r}"
            )
        if kwargs.get("max_len") is not None and not _positive_int(kwargs["max_len"]):
            raise ConfigError(
                f"combiner_kwargs 'max_len' must be an int >= 1 or None, got {kwargs['max_len']!r}"
            )
        if not isinstance(kwargs.get("ragged", False), bool):
            raise ConfigError(f"combiner_kwargs 'ragged' must be a bool, got {kwargs['ragged']!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(
                f"dtype must be float32, bfloat16 or float16, got {str(self.dtype)!r}"
            )
        if not isinstance(self.initializer, Initializer):
            raise ConfigError(
                f"initializer must be a recis_embedding Initializer, got "
                f"{type(self.initializer).__name__}"
            )
        if self.capacity is not None and not _positive_int(self.capacity):
            raise ConfigError(f"capacity must be an int >= 1 or None, got {self.capacity!r}")
        if self.admission is not None and not isinstance(self.admission, AdmissionPolicy):
            raise ConfigError(
                f"admission must be an AdmissionPolicy (e.g. FrequencyAdmission(2), or "
                f"make_policy('frequency', threshold=2)) or None, got {self.admission!r}"
            )
        if self.eviction is not None and not isinstance(self.eviction, EvictionPolicy):
            raise ConfigError(
                f"eviction must be an EvictionPolicy (e.g. StaleEviction(10), or "
                f"make_policy('stale', steps=10)) or None, got {self.eviction!r}"
            )
        if isinstance(self.eviction, CapacityEviction) and self.capacity is None:
            raise ConfigError(
                f"{self.eviction!r} evicts only from a full table, and this option sets no "
                "capacity: give it capacity=N, or use StaleEviction to age rows out"
            )
        for flag in ("trainable", "use_weight"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        wrong = default_value_error(self.default_value)
        if wrong is not None:
            raise ConfigError(wrong)
        if self.shared_name is not None and (
            not isinstance(self.shared_name, str) or not self.shared_name
        ):
            raise ConfigError(
                f"shared_name must be a non-empty str (a table name) or None, got "
                f"{self.shared_name!r}"
            )
        try:
            self.max_load_factor = check_load_factor("", self.max_load_factor)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.combiner_kwargs = kwargs
        self.default_value = float(self.default_value)
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        # "cpu:0" is "cpu", the device every CPU tensor reports (and one fusion key).
        self.device = torch.device("cpu") if device.type == "cpu" else device

    def _plain_numbers(self) -> None:
        """NumPy scalars (``np.int64(16)``, what NumPy reductions give) as Python numbers,
        before the checks; anything else is left for them to refuse."""
        for name in ("embedding_dim", "capacity", "default_value", "trainable", "use_weight"):
            setattr(self, name, plain(getattr(self, name)))
        if self.combiner_kwargs is not None and not isinstance(self.combiner_kwargs, Mapping):
            raise ConfigError(
                f"combiner_kwargs must be a dict (e.g. {{'tile_len': 4}}) or None, got "
                f"{type(self.combiner_kwargs).__name__} {self.combiner_kwargs!r}"
            )
        if self.combiner_kwargs:
            self.combiner_kwargs = {k: plain(v) for k, v in self.combiner_kwargs.items()}

    def storage_key(self) -> tuple:
        """What must match for two tables to share one physical table."""
        return (
            self.embedding_dim,
            self.dtype,
            str(self.device),
            self.trainable,
            policy_key(self.admission),
            policy_key(self.eviction),
            self.capacity,
            self.default_value,
            self.max_load_factor,
        )

    def runtime_key(self) -> tuple:
        """What must match for two lookups to share one reduce."""
        kwargs = self.combiner_kwargs or {}
        return (self.combiner, tuple(sorted(kwargs.items())), self.use_weight)

    def replace(self, **changes: Any) -> EmbeddingOption:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1
