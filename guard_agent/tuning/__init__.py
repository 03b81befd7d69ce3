"""Policy tuning from captured decisions: read, replay under a new policy, suggest thresholds, report."""

from guard_agent.tuning.policy_edit import Edit, retune_policy_text
from guard_agent.tuning.records import (
    Capture,
    CapturedDecision,
    PolicySnapshot,
    capture_files,
    read_capture,
    read_labels,
)
from guard_agent.tuning.replay import Change, ReplayResult, Rescorer, policy_from_snapshot, replay
from guard_agent.tuning.sealing import SealError, derive_key, open_features, seal_features
from guard_agent.tuning.thresholds import UNTUNED_SCORES, Suggestion, TradeOff, scores_by_name, suggest, trade_off

__all__ = [
    "UNTUNED_SCORES", "Capture", "CapturedDecision", "Change", "Edit", "PolicySnapshot", "ReplayResult", "Rescorer",
    "SealError", "Suggestion", "TradeOff", "capture_files", "derive_key", "open_features", "policy_from_snapshot",
    "read_capture", "read_labels", "replay", "retune_policy_text", "scores_by_name", "seal_features", "suggest",
    "trade_off",
]
