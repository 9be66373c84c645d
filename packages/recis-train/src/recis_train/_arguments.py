"""``TrainingArguments``: every knob of a training run, from code, YAML, JSON or CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recis_train.exceptions import ConfigError

_PRECISIONS = ("no", "bf16", "fp16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?")


@dataclasses.dataclass
class TrainingArguments:
    """Settings of one training run.

    Attributes:
        output_dir: where checkpoints and logs go.
        train_steps: stop after this many optimizer steps (``None``: run ``epochs`` passes).
        epochs: passes over the training data (each restarts the iterable). With both set,
            training stops at whichever comes first: ``train_steps`` steps, or the end of
            ``epochs`` passes (with a warning that the data ran out).
        eval_steps: batches per evaluation (``None``: the whole evaluation data).
        eval_every: evaluate every N optimizer steps in ``train_and_evaluate`` (0: at the end).
        log_every: steps between the lines of a ``LoggingHook`` among the trainer's hooks
            (the trainer adds none itself).
        save_every: checkpoint every N optimizer steps (0: only at the end of training).
        max_to_keep: complete checkpoints kept on disk (older ones are deleted).
        gradient_accumulation_steps: micro-batches summed into one optimizer step.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 adds loss scaling,
            works on CPU too, and cannot be combined with a sparse optimizer).
        grad_clip: clip the global norm of dense gradients to this value (``None``: no clip).
        seed: seeds torch, numpy and random at the start of a fresh run.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"`` (CUDA when available).
        deterministic: ask torch for deterministic algorithms (bit-exact resume on CPU).
        resume: the first ``train()`` of a ``Trainer`` first restores the latest checkpoint in
            ``output_dir`` if one exists (later calls continue from memory). ``False`` starts a
            new run, and refuses an ``output_dir`` that already holds checkpoints.
        save_at_end: write a checkpoint when training ends.
        history_size: keep only the latest this many training steps' logs in
            ``Trainer.history["train"]``, and so in each checkpoint (``None``: every step's).
            The older ones are dropped an eighth of this at a time, so up to that many more
            are held in between. A long or never-ending run (online training) bounds its
            memory and checkpoints with it; evaluations are all kept either way.
    """

    output_dir: str = "recis-output"
    train_steps: int | None = None
    epochs: int = 1
    eval_steps: int | None = None
    eval_every: int = 0
    log_every: int = 50
    save_every: int = 0
    max_to_keep: int = 3
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    resume: bool = True
    save_at_end: bool = True
    history_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, Path):
            self.output_dir = str(self.output_dir)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))
            _check_type(f.name, getattr(self, f.name))
        if not self.output_dir.strip():
            raise ConfigError("output_dir must name a directory, got an empty string")
        if self.grad_clip is not None:
            self.grad_clip = float(self.grad_clip)
        positive = ("epochs", "log_every", "max_to_keep", "gradient_accumulation_steps")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("train_steps", "eval_steps", "history_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 or None, got {value}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        # torch.manual_seed takes [-2**63, 2**64); NumPy and random get it modulo 2**32.
        if not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if self.mixed_precision not in _PRECISIONS:
            raise ConfigError(
                f"mixed_precision must be one of {list(_PRECISIONS)}, got {self.mixed_precision!r}"
            )
        if self.grad_clip is not None and not 0 < self.grad_clip < float("inf"):
            raise ConfigError(
                f"grad_clip must be positive and finite, or None, got {self.grad_clip}"
            )
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(
                f"device must be 'auto', 'cpu' or 'cuda[:N]' (or 'mps', 'xpu[:N]'), got "
                f"{self.device!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a plain, JSON-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "dict") -> TrainingArguments:
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming them."""
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{source}: expected a mapping of argument names, got {type(values).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - known))
        if unknown:
            raise ConfigError(f"{source}: unknown training argument(s) {unknown}")
        coerced = {name: _coerce(name, value, source) for name, value in values.items()}
        try:
            return cls(**coerced)
        except ConfigError as exc:
            # Name where the value came from (a file, a stage), as the type checks above do.
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> TrainingArguments:
        """Load from a JSON file holding one object."""
        return cls.from_dict(_read_json(path), source=str(path))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainingArguments:
        """Load from a YAML file holding one mapping.

        YAML 1.1 reads an unquoted ``no`` as false; ``mixed_precision: no`` means ``"no"``.
        """
        return cls.from_dict(_read_yaml(path), source=str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> TrainingArguments:
        """Load from ``.json``, ``.yaml`` or ``.yml`` by the file's suffix."""
        return cls.from_dict(_read_file(path), source=str(path))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--flag`` per argument (``--train-steps 100``, ``--no-resume``) and ``--config``."""
        parser.add_argument(
            "--config",
            help="a .json/.yaml file of training arguments; flags given override its values",
        )
        helps = _field_help()
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            text = helps.get(f.name)
            if _base_type(f.name) is bool:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=text,
                )
            else:
                parser.add_argument(
                    flag, dest=f.name, default=None, metavar=f.name.upper(), help=text
                )

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> TrainingArguments:
        """Parse CLI flags; values given as flags override those of ``--config``."""
        # No abbreviations: a misspelled flag (--train-step) is an error, as an unknown key
        # of a config file is.
        parser = argparse.ArgumentParser(description="recis training arguments", allow_abbrev=False)
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> TrainingArguments:
        """Build from a namespace filled by a parser that :meth:`add_arguments` extended."""
        flags: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            given = getattr(namespace, f.name, None)
            if given is not None:
                flags[f.name] = given
        config = getattr(namespace, "config", None)
        if not config:
            return cls.from_dict(flags, source="command line")
        # The flags override the file's values before anything is checked, so a flag may
        # replace a value the file got wrong.
        values = _read_file(config)
        if not isinstance(values, Mapping):
            return cls.from_dict(values, source=str(config))  # raises, naming the file
        return cls.from_dict({**values, **flags}, source=f"{config} and the command line")


def _read_file(path: str | Path) -> Any:
    """The values of a ``.json``, ``.yaml`` or ``.yml`` file, by its suffix, unchecked."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".yaml", ".yml"):
        return _read_yaml(path)
    raise ConfigError(f"{path}: expected a .json, .yaml or .yml file")


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid json ({err})") from err


def _read_yaml(path: str | Path) -> Any:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid yaml ({err})") from err
    # An empty file (or one of comments only) loads as None: no values. Anything else that is
    # not a mapping ([], 0, false) is refused by the caller, as in JSON.
    return {} if values is None else values


def _field_help() -> dict[str, str]:
    """Each field's description from the ``Attributes:`` section of the class docstring, with
    its default, for ``--help``."""
    helps: dict[str, list[str]] = {}
    current: list[str] | None = None
    lines = (TrainingArguments.__doc__ or "").split("Attributes:", 1)[-1].splitlines()
    for line in lines:
        text = line.strip()
        name, _, rest = text.partition(": ")
        if name.isidentifier() and rest and line.startswith(" " * 8) and line[8] != " ":
            current = helps[name] = [rest]
        elif text and current is not None:
            current.append(text)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    return {
        name: " ".join(parts).replace("``", "").replace("%", "%%").rstrip(".")
        + f" (default: {defaults[name]})"
        for name, parts in helps.items()
    }


def _base_type(name: str) -> type:
    hint = typing.get_type_hints(TrainingArguments)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _optional(name: str) -> bool:
    hint = typing.get_type_hints(TrainingArguments)[name]
    return type(None) in typing.get_args(hint)


def _plain(value: Any) -> Any:
    """A NumPy scalar (``np.int64(1000)``, what NumPy reductions and arrays give) as the Python
    bool, int or float it holds; anything else unchanged, for :func:`_check_type` to judge."""
    if type(value) in (bool, int, float, str) or value is None:
        return value
    if type(value).__module__ == "numpy" and isinstance(value, numbers.Integral):
        return int(value)
    if type(value).__module__ == "numpy" and isinstance(value, numbers.Real):
        return float(value)
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    return value


def _check_type(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` has the field's type (ints for floats too)."""
    target = _base_type(name)
    if value is None and _optional(name):
        return
    fits = isinstance(value, target) and not (target is int and isinstance(value, bool))
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        fits = True
    if not fits:
        wanted = f"{target.__name__} or None" if _optional(name) else target.__name__
        if name == "output_dir":
            wanted = "str or pathlib.Path"
        raise ConfigError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert strings from flags/YAML to the field's type; reject what does not fit."""
    target = _base_type(name)
    value = _plain(value)
    if name == "output_dir" and isinstance(value, Path):
        return str(value)
    if name == "mixed_precision" and value is False:
        return "no"  # YAML 1.1 (PyYAML) reads an unquoted `no` as false
    if value is None or (
        isinstance(value, target) and not (target is int and isinstance(value, bool))
    ):
        return value
    if isinstance(value, str):
        if value.lower() in ("none", "null") and target is not str:
            return None
        if target is bool:
            if value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ConfigError(f"{source}: {name} must be bool, got {value!r}")
        try:
            return target(value)
        except ValueError:
            pass
    elif target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{source}: {name} must be {target.__name__}, got {value!r}")
