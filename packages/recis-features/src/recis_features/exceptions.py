"""Exceptions raised by recis-features.

Every error derives from :class:`RecisFeaturesError`; each leaf also derives from the builtin a
caller would naturally catch (``ValueError``, ``TypeError``, ``KeyError``).
"""

from __future__ import annotations

__all__ = [
    "FeatureConflictError",
    "FeatureDefinitionError",
    "FeatureInputError",
    "FeatureTypeError",
    "MissingColumnError",
    "RecisFeaturesError",
    "RegistrationError",
    "SerializationError",
]


class RecisFeaturesError(Exception):
    """Base class of every recis-features error."""


class FeatureDefinitionError(RecisFeaturesError, ValueError):
    """A feature or op is declared with invalid parameters or in an invalid order."""


class FeatureConflictError(RecisFeaturesError, ValueError):
    """Two different definitions share one output name."""


class FeatureInputError(RecisFeaturesError, ValueError):
    """A column's data cannot be used as given (e.g. ragged offsets that do not fit the values,
    or columns of one cross with different row counts)."""


class FeatureTypeError(RecisFeaturesError, TypeError):
    """An op received a value of the wrong kind (e.g. bucketize on integer ids)."""


class MissingColumnError(RecisFeaturesError, KeyError):
    """A feature reads a column that the batch does not have."""

    def __str__(self) -> str:
        # KeyError quotes its argument; the message reads better without the quotes.
        return str(self.args[0]) if self.args else ""


class SerializationError(RecisFeaturesError, ValueError):
    """A feature or engine cannot be written to, or read from, a plain dict."""


class RegistrationError(RecisFeaturesError, ValueError):
    """An op kind or fused implementation is registered twice or with a bad signature."""
