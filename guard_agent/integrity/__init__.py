"""Model integrity: canary queries, model metadata and signed model files.

``make_integrity(state)`` returns the checker the guard plugs into its ``Integrity`` seam (score
``integrity.canary``: 1.0 while the model fails a check), or None when nothing is configured. The format and
signing helpers are public for the ``guard-agent canary`` and ``guard-agent sign`` commands.
"""

from guard_agent.integrity._canaries import CanaryError, CanarySet, load_canaries, load_canary_dir, save_canaries
from guard_agent.integrity._checker import IntegrityChecker, make_integrity
from guard_agent.integrity._compare import CanaryDiff, CanaryResult, compare_answers, metadata_changes
from guard_agent.integrity._select import Selection, select_canaries, top2_margin
from guard_agent.integrity._signing import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Problem,
    SigningError,
    VerifyReport,
    build_manifest,
    key_id,
    load_private_key,
    load_public_key,
    sign_directory,
    verify_directory,
)
from guard_agent.integrity._upstream import Answer, UpstreamError, fetch_metadata, infer

__all__ = [
    "MANIFEST_FILE",
    "SIGNATURE_FILE",
    "Answer",
    "CanaryDiff",
    "CanaryError",
    "CanaryResult",
    "CanarySet",
    "IntegrityChecker",
    "Problem",
    "Selection",
    "SigningError",
    "UpstreamError",
    "VerifyReport",
    "build_manifest",
    "compare_answers",
    "fetch_metadata",
    "infer",
    "key_id",
    "load_canaries",
    "load_canary_dir",
    "load_private_key",
    "load_public_key",
    "make_integrity",
    "metadata_changes",
    "save_canaries",
    "select_canaries",
    "sign_directory",
    "top2_margin",
    "verify_directory",
]
