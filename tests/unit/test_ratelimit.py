"""The admission step's pure functions (token bucket, cool-down start) that the proxy and the replay share."""

from __future__ import annotations

from guard_agent.policy import parse_policy
from guard_agent.policy.model import Decision, RateLimit
from guard_agent.ratelimit import Bucket, cooldown_start, rate_check

POLICY = parse_policy("version: 1\nblock: {cooldown_seconds: 300}\n").policy.for_model(None)
NO_COOLDOWN = parse_policy("version: 1\nblock: {cooldown_seconds: 0}\n").policy.for_model(None)


class TestRateCheck:
    def test_no_limit_keeps_the_bucket(self) -> None:
        """Without a limit nothing is limited and the bucket is left as it was."""
        b = Bucket(1.0, 5.0)
        assert rate_check(b, 10.0, None) == (b, False, 0.0)

    def test_burst_then_limited_then_refilled(self) -> None:
        """A burst of 2 at 1/s: two pass, the third is limited for 1 s, one passes again a second later."""
        limit = RateLimit(rate=1.0, burst=2.0)
        b, limited, _ = rate_check(None, 0.0, limit)
        assert not limited
        b, limited, _ = rate_check(b, 0.0, limit)
        assert not limited
        b, limited, retry = rate_check(b, 0.0, limit)
        assert limited and retry == 1.0
        _, limited, _ = rate_check(b, 1.0, limit)
        assert not limited


class TestCooldownStart:
    def test_enforced_block_starts_the_policy_cooldown(self) -> None:
        """An enforced block with no cool-down running starts the policy's."""
        assert cooldown_start(Decision("block", "r1"), POLICY, 100.0, None) == (400.0, "r1")

    def test_rule_cooldown_wins_and_zero_starts_none(self) -> None:
        """A rule's own cool-down replaces the policy's; zero (its own or the policy's) starts none."""
        assert cooldown_start(Decision("block", "r1", cooldown=5.0), POLICY, 100.0, None) == (105.0, "r1")
        assert cooldown_start(Decision("block", "r1", cooldown=0.0), POLICY, 100.0, None) is None
        assert cooldown_start(Decision("block", "r1"), NO_COOLDOWN, 100.0, None) is None

    def test_nothing_for_monitor_other_actions_or_a_running_cooldown(self) -> None:
        """Not enforced, not a block, or a cool-down already running: nothing starts (it is not extended)."""
        assert cooldown_start(Decision("block", "r1", enforced=False), POLICY, 100.0, None) is None
        assert cooldown_start(Decision("throttle", "r1"), POLICY, 100.0, None) is None
        assert cooldown_start(Decision("block", "r1"), POLICY, 100.0, "earlier") is None
