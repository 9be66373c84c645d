"""How embedding tables get into checkpoints: the seam between the trainer and recis-embedding."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from recis_train.exceptions import CheckpointError

_EMBEDDING_PACKAGE = "recis_embedding"


class SparseCheckpoint(Protocol):
    """Saves and loads the parts of a model that the dense ``state_dict`` does not carry.

    An implementation may also define ``verify(directory) -> list[str]``: what is wrong with
    data its part refers to outside the checkpoint (each item naming a file), checked with the
    checkpoint's own checksums before a restore loads anything; a non-empty list makes a
    restore of the latest checkpoint fall back to the one before it.

    ``load`` may also take a keyword ``verified``: a restore passes ``verified=True`` when it
    has just checked the part's files against the checkpoint's checksums (and run ``verify``),
    so the load need not read them once more to check them.
    """

    def save(self, directory: Path, model: nn.Module, sparse_optimizer: Any) -> None:
        """Write the tables (and the sparse optimizer's per-row state) into ``directory``."""

    def load(self, directory: Path, model: nn.Module, sparse_optimizer: Any) -> None:
        """Load what :meth:`save` wrote into the model and optimizer."""

    def filter_dense(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``state`` without the entries this object saves itself."""


def embedding_prefixes(model: nn.Module) -> list[str]:
    """Module paths in ``model`` whose class comes from recis-embedding (outermost only)."""
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if type(module).__module__.split(".")[0] != _EMBEDDING_PACKAGE:
            continue
        if not any(name == p or name.startswith(p + ".") for p in prefixes):
            prefixes.append(name)
    return prefixes


class EmbeddingCheckpoint:
    """Checkpoints recis-embedding tables with ``recis_embedding.save`` / ``load``.

    The tables' entries (if any appear in the model's ``state_dict``) are left out of the
    dense file, so each row is stored once, in recis-embedding's open format; the tables are
    saved with ``dense=False``, so the dense state is stored once too, in the checkpoint's
    dense part. A load leaves the dense state to that part, also from a checkpoint whose
    tables were saved with it (written before).
    """

    def __init__(self, prefixes: list[str]) -> None:
        self.prefixes = prefixes

    def save(self, directory: Path, model: nn.Module, sparse_optimizer: Any) -> None:
        _function("save")(str(directory / "tables"), model, sparse_optimizer, dense=False)

    def load(
        self, directory: Path, model: nn.Module, sparse_optimizer: Any, *, verified: bool = False
    ) -> None:
        """Load the tables; ``verified``: the restore has checked their files with the trainer
        checkpoint's checksums, so recis-embedding does not hash them again."""
        _function("load")(
            str(directory / "tables"), model, sparse_optimizer, dense=False, verify=not verified
        )

    def filter_dense(self, state: Mapping[str, Any]) -> dict[str, Any]:
        def owned(key: str) -> bool:
            return any(p == "" or key.startswith(p + ".") for p in self.prefixes)

        return {k: v for k, v in state.items() if not owned(k)}


def _function(name: str) -> Any:
    import recis_embedding

    found = getattr(recis_embedding, name, None)
    if not callable(found):
        raise CheckpointError(
            f"the model holds recis-embedding tables but recis_embedding has no {name}(); "
            "upgrade recis-embedding or pass sparse_checkpoint= to the Trainer"
        )
    return found


def load_sparse(
    part: SparseCheckpoint,
    directory: Path,
    model: nn.Module,
    sparse_optimizer: Any,
    *,
    verified: bool,
) -> None:
    """``part.load``, telling it ``verified=True`` (when its ``load`` takes that keyword) if
    the restore has just checked every file of the part against the checkpoint's checksums."""
    if verified:
        try:
            takes = "verified" in inspect.signature(part.load).parameters
        except (TypeError, ValueError):  # a callable without a signature Python can read
            takes = False
        if takes:
            part.load(directory, model, sparse_optimizer, verified=True)  # type: ignore[call-arg]
            return
    part.load(directory, model, sparse_optimizer)


def default_sparse_checkpoint(model: nn.Module) -> SparseCheckpoint | None:
    """An :class:`EmbeddingCheckpoint` when ``model`` holds recis-embedding modules, else None."""
    if importlib.util.find_spec(_EMBEDDING_PACKAGE) is None:
        return None
    prefixes = embedding_prefixes(model)
    return EmbeddingCheckpoint(prefixes) if prefixes else None


def tables_saved_separately() -> contextlib.AbstractContextManager[Any]:
    """Silences recis-embedding's warning that ``state_dict()`` holds no embeddings.

    For the trainer's own ``model.state_dict()`` calls: it saves the tables through its
    :class:`SparseCheckpoint` and otherwise reads the state dict for dense tensors only. A
    no-op when recis-embedding is not imported (then the model holds no tables) or predates
    the warning.
    """
    module = sys.modules.get(_EMBEDDING_PACKAGE)
    found = getattr(module, "tables_saved_separately", None)
    return found() if callable(found) else contextlib.nullcontext()
