"""Attack clients that query a model through the guard, for benchmarks and ``guard-agent selftest``.

Black-box evasion (ART HopSkipJump, BoundaryAttack) and model extraction (ART CopycatCNN,
KnockoffNets, JBDA, uniform random, natural data of another distribution). ART is imported lazily:
install the ``[attack]`` extra to run them; importing this package does not need it.
"""

from ._client import REFUSED, Answer, AttackBlocked, GuardClient
from ._data import natural_patches, uniform_queries
from ._evasion import black_box_evasion
from ._extraction import Extraction, extraction_attack, fidelity
from ._result import AttackResult

__all__ = [
    "REFUSED",
    "Answer",
    "AttackBlocked",
    "AttackResult",
    "Extraction",
    "GuardClient",
    "black_box_evasion",
    "extraction_attack",
    "fidelity",
    "natural_patches",
    "uniform_queries",
]
