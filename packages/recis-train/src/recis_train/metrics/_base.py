"""The streaming metric protocol and the helpers every metric shares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from recis_embedding._sharding import cuda_only
from recis_train._distributed import all_reduce, gather_objects
from recis_train.exceptions import MetricInputError


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo and others take CPU tensors.
    if cuda_only(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def as_flat(
    value: Any, what: str, metric: str, dtype: torch.dtype, *, keep: bool = False
) -> torch.Tensor:
    """``value`` as a detached 1-d CPU tensor of ``dtype``, or a clear error naming it.

    ``keep``: the metric keeps the result past this call, so it is always a copy; otherwise it
    may share memory with ``value`` (a CPU tensor or array of ``dtype`` already), which the
    caller may refill before ``compute``."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise MetricInputError(
                f"{metric}: {what} must be a tensor, got {type(value).__name__}"
            ) from err
    if value.is_complex():
        raise MetricInputError(f"{metric}: {what} must be real, got dtype {value.dtype}")
    return value.detach().reshape(-1).to("cpu", dtype, copy=keep)


def check_pair(preds: torch.Tensor, labels: torch.Tensor, metric: str, *, binary: bool) -> None:
    """Validate one batch of predictions and labels (same length, finite, labels in range)."""
    if preds.numel() != labels.numel():
        raise MetricInputError(
            f"{metric}: preds has {preds.numel()} elements but labels has {labels.numel()}"
        )
    finite = torch.isfinite(preds)
    if not bool(finite.all()):
        raise MetricInputError(f"{metric}: preds contain nan or inf: {_first(preds, ~finite)}")
    if labels.numel() == 0:
        return
    if binary:
        bad = (labels != 0) & (labels != 1)
        if bool(bad.any()):
            found = labels[bad][0].item()
            hint = (
                "; soft labels need metrics that accept them: pass e.g. "
                "metrics={'logloss': LogLoss, 'calibration': Calibration} to the Trainer "
                "(or a Task)"
                if 0 < found < 1
                else ""
            )
            raise MetricInputError(
                f"{metric}: labels must be 0 or 1, found {_first(labels, bad)}{hint}"
            )
    else:
        finite = torch.isfinite(labels)
        if not bool(finite.all()):
            raise MetricInputError(
                f"{metric}: labels must be finite, found {_first(labels, ~finite)}"
            )
        outside = (labels < 0) | (labels > 1)
        if bool(outside.any()):
            raise MetricInputError(
                f"{metric}: labels must lie in [0, 1], found {_first(labels, outside)}"
            )


def _first(tensor: torch.Tensor, bad: torch.Tensor) -> str:
    """``tensor``'s first entry where ``bad`` holds, with its position unless it is a scalar."""
    value = tensor[bad][0].item()
    if tensor.dim() == 0:
        return repr(value)
    pos = tuple(int(i) for i in bad.nonzero()[0])
    return f"{value!r} at {pos[0] if len(pos) == 1 else pos}"


class Metric:
    """A streaming metric: ``update`` per batch, ``compute`` at the end, ``reset`` to start over.

    Subclasses keep their state as named tensors in ``self._state`` and say how each combines
    across ranks: ``"sum"`` states are all-reduced, ``"cat"`` states are all-gathered and
    concatenated. When ``torch.distributed`` is initialized with more than one rank, ``compute``
    combines every rank's state first, so every rank returns the same value for the whole data.
    It is a collective call then: every rank must call it.
    """

    #: state name -> "sum" or "cat"
    _reductions: Mapping[str, str] = {}

    def __init__(self) -> None:
        self._state: dict[str, Any] = {}
        self.reset()

    def _initial_state(self) -> dict[str, torch.Tensor]:
        """Fresh state: "cat" entries are the empty tensor their chunks concatenate to."""
        raise NotImplementedError

    def _compute(self, state: Mapping[str, torch.Tensor]) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._state = {
            name: [value] if self._reductions[name] == "cat" else value
            for name, value in self._initial_state().items()
        }

    def compute(self) -> float:
        """The metric over every batch seen since the last reset (on every rank when distributed)."""
        return self._compute(self._synced_state())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's state as CPU tensors (what a checkpoint stores)."""
        return {name: self._local(name).clone() for name in self._state}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a state produced by :meth:`state_dict` of the same metric type."""
        initial = self._initial_state()
        if not isinstance(state, Mapping):
            raise MetricInputError(
                f"{type(self).__name__}: a state is a mapping of names to tensors (what "
                f"state_dict() returns), got {type(state).__name__}"
            )
        if set(state) != set(initial):
            raise MetricInputError(
                f"{type(self).__name__}: state has keys {sorted(state)}, expected {sorted(initial)}"
            )
        loaded = {}
        for name, value in state.items():
            try:
                tensor = torch.as_tensor(value).detach().to("cpu").clone()
            except (TypeError, ValueError, RuntimeError) as exc:
                raise MetricInputError(
                    f"{self!r}: state {name!r} must be a tensor, got {type(value).__name__}: {exc}"
                ) from exc
            fresh = initial[name]
            if tensor.is_complex():
                raise MetricInputError(f"{self!r}: state {name!r} has complex dtype {tensor.dtype}")
            cat = self._reductions[name] == "cat"
            # A "sum" state has a fixed shape (e.g. one count per threshold); a "cat" state is
            # 1-d of any length. Another configuration's state (e.g. other thresholds) is refused.
            if (tensor.dim() != 1) if cat else (tensor.shape != fresh.shape):
                wanted = "1-d" if cat else f"shape {tuple(fresh.shape)}"
                raise MetricInputError(
                    f"{self!r}: state {name!r} has shape {tuple(tensor.shape)}, expected "
                    f"{wanted} (a state of a metric configured otherwise?)"
                )
            if tensor.is_floating_point():
                bad = ~torch.isfinite(tensor)
                if not fresh.is_floating_point():
                    # Integers, and within int64: a cast would clamp larger ones together.
                    bad |= (tensor != tensor.round()) | (tensor < -(2.0**63)) | (tensor >= 2.0**63)
                if bool(bad.any()):
                    raise MetricInputError(
                        f"{self!r}: state {name!r} holds {_first(tensor, bad)}, expected "
                        + ("finite values" if fresh.is_floating_point() else "integers")
                    )
            loaded[name] = tensor.to(fresh.dtype)
        lengths = {name: t.numel() for name, t in loaded.items() if self._reductions[name] == "cat"}
        if len(set(lengths.values())) > 1:
            raise MetricInputError(
                f"{self!r}: state entries hold different numbers of rows {lengths}"
            )
        self._check_loaded(loaded)
        for name, tensor in loaded.items():
            self._state[name] = [tensor] if self._reductions[name] == "cat" else tensor

    def _check_loaded(self, state: Mapping[str, torch.Tensor]) -> None:
        """Refuse a loaded state (right keys, shapes, finite) that ``update`` could not have
        produced, with a :class:`MetricInputError` naming the entry; nothing is loaded then."""

    def _refuse(self, name: str, tensor: torch.Tensor, bad: torch.Tensor, expected: str) -> None:
        """Raise for the first entry of ``tensor`` where ``bad`` holds, if any."""
        if bool(bad.any()):
            raise MetricInputError(
                f"{self!r}: state {name!r} holds {_first(tensor, bad)}, expected {expected}"
            )

    def _refuse_counts(self, state: Mapping[str, torch.Tensor], *names: str) -> None:
        """Counts are whole numbers of rows, at least 0."""
        for name in names:
            t = state[name]
            self._refuse(name, t, (t < 0) | (t != t.round()), "counts (whole numbers >= 0)")

    def _append(self, name: str, value: torch.Tensor) -> None:
        # Chunks are concatenated once at compute time, not on every update (quadratic copying).
        self._state[name].append(value)

    def _local(self, name: str) -> torch.Tensor:
        value = self._state[name]
        if self._reductions[name] == "cat":
            merged = torch.cat(value)
            self._state[name] = [merged]
            return merged
        return value

    def _synced_state(self) -> dict[str, torch.Tensor]:
        local = {name: self._local(name) for name in self._state}
        if _world_size() == 1:
            return local
        synced = {}
        for name, tensor in local.items():
            if self._reductions[name] == "sum":
                reduced = tensor.to(_collective_device(), copy=True)
                all_reduce(reduced)
                synced[name] = reduced.cpu()
            else:
                # Ranks hold different lengths; object gather avoids a pad-and-trim protocol.
                synced[name] = torch.cat(gather_objects(tensor))
        return synced

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
