"""recis-features: declarative feature transforms, fused automatically across features.

Declare features as chains of ops, hand them to a :class:`FeatureEngine`, and call it on a batch::

    engine = FeatureEngine([
        Feature("uid").select("user_id").mod(10_000_000),
        Feature("price").select("price").fill_missing(0.0).bucketize([1.0, 10.0, 100.0]),
        Feature("uid_x_item").select_fields(["user_id", "item_id"]).cross().mod(1 << 24),
    ])
    out = engine(batch)
"""

from recis_features import _fused  # noqa: F401  (registers the built-in fused implementations)
from recis_features._engine import FeatureEngine
from recis_features._feature import Feature
from recis_features._fusion import FusedFn, fused_implementation, fused_kinds, register_fused
from recis_features._op import Op, SourceOp, Transform, op_kinds
from recis_features._ops import (
    Bucketize,
    FeatureCross,
    FillMissing,
    Hash,
    IDMultiHash,
    Lambda,
    Log1p,
    Mod,
    Normalize,
    SelectField,
    SelectFields,
    SequenceTruncate,
)
from recis_features.exceptions import (
    FeatureConflictError,
    FeatureDefinitionError,
    FeatureInputError,
    FeatureTypeError,
    MissingColumnError,
    RecisFeaturesError,
    RegistrationError,
    SerializationError,
)

__version__ = "0.1.0"

__all__ = [
    "Bucketize",
    "Feature",
    "FeatureConflictError",
    "FeatureCross",
    "FeatureDefinitionError",
    "FeatureEngine",
    "FeatureInputError",
    "FeatureTypeError",
    "FillMissing",
    "FusedFn",
    "Hash",
    "IDMultiHash",
    "Lambda",
    "Log1p",
    "MissingColumnError",
    "Mod",
    "Normalize",
    "Op",
    "RecisFeaturesError",
    "RegistrationError",
    "SelectField",
    "SelectFields",
    "SequenceTruncate",
    "SerializationError",
    "SourceOp",
    "Transform",
    "__version__",
    "fused_implementation",
    "fused_kinds",
    "op_kinds",
    "register_fused",
]
