"""A bounded red-team self-test of a running guard: benign traffic, OOD inputs, black-box evasion, extraction."""

from guard_agent.selftest._checks import CheckResult, SelftestConfig, run_checks
from guard_agent.selftest._client import Answer, Budget, BudgetExhausted, InferenceClient

__all__ = ["Answer", "Budget", "BudgetExhausted", "CheckResult", "InferenceClient", "SelftestConfig", "run_checks"]
