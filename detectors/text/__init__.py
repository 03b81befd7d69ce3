"""Text inputs for the detectors: hashed n-grams, a fitted projection, and cheap character checks.

Pure library (numpy, scipy, scikit-learn). Texts become ``n_components + 3`` numeric features
(``TextProjection``) that the ordinary detectors and session trackers score; ``TextChecks`` adds four
character-level scores. ``fit_text_profile`` puts both into a normal profile directory.
"""

from ._checks import CHECK_NAMES, TextChecks, text_statistics
from ._hashing import HASH_COLUMNS, hashed
from ._profile import TEXT_COMPONENT, TextModel, fit_text_profile
from ._projection import TextProjection

__all__ = [
    "CHECK_NAMES",
    "HASH_COLUMNS",
    "TEXT_COMPONENT",
    "TextChecks",
    "TextModel",
    "TextProjection",
    "fit_text_profile",
    "hashed",
    "text_statistics",
]
