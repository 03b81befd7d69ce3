"""Pure detector and session-tracker library (numpy, scipy, scikit-learn; no web, no clock).

Stateless detectors share one shape: keyword-only constructor, `fit(X) -> self`, `score_samples(X)` (higher =
more anomalous), `infer_threshold(X_val, fpr)`, `p_values(scores)`. A `Profile` bundles fitted detectors with
their calibration so that every score is on one [0, 1] scale.
"""

from ._base import BaseDetector, NotFittedError
from ._errors import ProfileError
from .combine import PValueCombiner, combine_statistic
from .copula import CopulaMahalanobis
from .iforest import IsolationForestDetector
from .knn import KNNDistance
from .mahalanobis import Mahalanobis
from .pca import PCAReconstruction
from .profile import (
    COMBINED,
    DEFAULT_DETECTORS,
    DETECTOR_CLASSES,
    Profile,
    fit_profile,
    load_profile,
    load_profiles,
    load_reference,
    save_profile,
)
from .schema import SchemaRange
from .squeeze import squeeze_distance, squeeze_variants

__all__ = [
    "COMBINED",
    "DEFAULT_DETECTORS",
    "DETECTOR_CLASSES",
    "BaseDetector",
    "CopulaMahalanobis",
    "IsolationForestDetector",
    "KNNDistance",
    "Mahalanobis",
    "NotFittedError",
    "PCAReconstruction",
    "PValueCombiner",
    "Profile",
    "ProfileError",
    "SchemaRange",
    "combine_statistic",
    "fit_profile",
    "load_profile",
    "load_profiles",
    "load_reference",
    "save_profile",
    "squeeze_distance",
    "squeeze_variants",
]
