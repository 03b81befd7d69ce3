"""Attack clients that query a model through the guard, for benchmarks and ``guard-agent selftest``.

Black-box evasion (ART HopSkipJump, BoundaryAttack) and model extraction (ART CopycatCNN,
KnockoffNets, JBDA, uniform random, natural data of another distribution); for text classifiers, greedy word
substitution, character edits and extraction with texts of another corpus (``_text_attacks``). ART is imported lazily:
install the ``[attack]`` extra to run them; importing this package does not need it.
"""

from ._client import REFUSED, Answer, AttackBlocked, GuardClient
from ._data import natural_patches, uniform_queries
from ._evasion import black_box_evasion
from ._extraction import Extraction, extraction_attack, fidelity
from ._result import AttackResult
from ._text_attacks import char_swap, text_extraction, word_substitution
from ._text_client import TextClient, text_body
from ._text_data import fortune_texts, labelled_fortunes, text_classifier

__all__ = [
    "REFUSED",
    "Answer",
    "AttackBlocked",
    "AttackResult",
    "Extraction",
    "GuardClient",
    "TextClient",
    "black_box_evasion",
    "char_swap",
    "extraction_attack",
    "fidelity",
    "fortune_texts",
    "labelled_fortunes",
    "natural_patches",
    "text_body",
    "text_classifier",
    "text_extraction",
    "uniform_queries",
    "word_substitution",
]
