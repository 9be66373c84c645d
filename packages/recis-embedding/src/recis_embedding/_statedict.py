"""Why ``model.state_dict()`` holds no embeddings, said where it matters.

Tables are neither parameters nor buffers, so ``torch.save(model.state_dict())`` followed by
``load_state_dict`` silently leaves every table as it was (freshly initialized in a new model).
Each :class:`~recis_embedding.EmbeddingEngine` registers :func:`warn_tables_not_in_state_dict`
as a ``state_dict`` pre-hook: when its tables hold rows it warns with
:class:`~recis_embedding.TablesNotInStateDictWarning`, once per call site (the first frame
outside torch and recis-embedding), unless the call runs inside
:func:`tables_saved_separately`. The hook runs for submodules too, so a model wrapped in
``DistributedDataParallel`` (or any container) warns the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
from collections.abc import Iterator
from types import FrameType
from typing import Any

from torch import nn

from recis_embedding.exceptions import TablesNotInStateDictWarning

__all__ = ["tables_saved_separately", "warn_tables_not_in_state_dict"]

_SILENCED: contextvars.ContextVar[int] = contextvars.ContextVar(
    "recis_embedding_tables_saved_separately", default=0
)
# Packages whose frames are not the call site: torch's Module.state_dict recursion (and its
# wrappers) and this package (save() takes the dense state itself).
_SKIPPED = frozenset({"torch", "recis_embedding"})
# Per call site and module path, the warnings registry of that site (see _warn_once).
_REGISTRIES: dict[tuple[str, int, str], dict[Any, Any]] = {}


@contextlib.contextmanager
def tables_saved_separately() -> Iterator[None]:
    """Silence :class:`~recis_embedding.TablesNotInStateDictWarning` inside the block.

    For code that takes ``model.state_dict()`` knowing that the tables are not in it and saves
    them on its own (with :func:`recis_embedding.save`, as recis-train's checkpoints do), or
    that reads the state dict for its dense tensors only. Nests, works as a decorator, and
    holds for the current thread (or asyncio task) only.

    Example:
        >>> with recis_embedding.tables_saved_separately():  # doctest: +SKIP
        ...     torch.save(model.state_dict(), "dense.pt")
        ...     recis_embedding.save("tables", model, sparse_optimizer)
    """
    token = _SILENCED.set(_SILENCED.get() + 1)
    try:
        yield
    finally:
        _SILENCED.reset(token)


def warn_tables_not_in_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook of an ``EmbeddingEngine``: warn when its tables hold rows."""
    del keep_vars
    if _SILENCED.get():
        return
    rows = module.rows_per_table()  # type: ignore[operator]
    held = {name: n for name, n in rows.items() if n}
    if not held:
        return
    frame = _call_site()
    kind = type(module).__name__
    wrapper = getattr(module, "_wrapped_by", None)
    if wrapper is not None:  # a DynamicEmbedding's engine: named for the DynamicEmbedding
        kind, prefix = wrapper, prefix.removesuffix("engine.")
    where = f"module {prefix[:-1]!r}" if prefix else f"the {kind}"
    if frame is None:
        site = ("<unknown>", 0, prefix)
        filename, lineno, name, module_globals = "<unknown>", 0, "<unknown>", None
    else:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        name = frame.f_globals.get("__name__", "<string>")
        module_globals = frame.f_globals
        site = (filename, lineno, prefix)
    shard = " (this rank's shard)" if getattr(module, "shard", None) is not None else ""
    total = sum(held.values())
    tables = ", ".join(f"{t!r}: {n:,}" for t, n in sorted(held.items()))
    message = (
        f"state_dict() holds no embeddings: the tables of {where}{shard} hold {total:,} "
        f"{'rows that are' if total != 1 else 'row that is'} not in it ({tables}), and a "
        "load_state_dict() of it leaves the tables as they are (freshly initialized in a new "
        "model). Save and load the tables with recis_embedding.save(path, model, "
        "sparse_optimizer) and recis_embedding.load(...), as recis-train's checkpoints do; "
        "code that does so silences this warning with recis_embedding.tables_saved_separately()"
    )
    _warn_once(message, site, filename, lineno, name, module_globals)


def _call_site() -> FrameType | None:
    """The innermost frame outside torch and recis-embedding: where ``state_dict()`` was called."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if name.split(".", 1)[0] not in _SKIPPED:
            return frame
        frame = frame.f_back
    return None


def _warn_once(
    message: str,
    site: tuple[str, int, str],
    filename: str,
    lineno: int,
    module: str,
    module_globals: dict[str, Any] | None,
) -> None:
    """``warnings.warn_explicit`` at ``site``, shown once there although the text varies.

    The warnings module remembers a shown warning by its text, and the row counts change from
    call to call. Each site keeps its own registry, and a warning it recorded is carried over
    to the new text, so the registry answers as if the text were the same: under the
    ``"default"`` action the warning shows once per site; ``"always"`` and ``"error"`` (which
    record nothing) act on every call; and any change of the filters (``catch_warnings``,
    ``simplefilter``) clears the registry, so the next call shows it again.
    """
    registry = _REGISTRIES.setdefault(site, {})
    category = TablesNotInStateDictWarning
    for key in [k for k in registry if isinstance(k, tuple) and len(k) == 3 and k[1] is category]:
        registry[(message, key[1], key[2])] = registry.pop(key)
    warnings.warn_explicit(
        message,
        category,
        filename,
        lineno,
        module=module,
        registry=registry,
        module_globals=module_globals,
    )
