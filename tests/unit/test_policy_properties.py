"""Property tests: the policy loader either compiles a policy or raises PolicyError, never anything else."""

from __future__ import annotations

import contextlib

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from guard_agent.policy import PolicyError, parse_policy

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)), max_leaves=20)
keys = st.sampled_from(["version", "mode", "rules", "input", "rate_limit", "hardening", "lists", "failure",
                        "block", "squeeze", "models", "id", "when", "action", "ood.combined", "gte", "x"])
documents = st.dictionaries(keys, values, max_size=8).map(lambda d: {"version": 1, **d})


class TestLoaderProperties:
    @settings(max_examples=300, deadline=None)
    @given(documents)
    def test_structured_garbage(self, doc: dict) -> None:  # type: ignore[type-arg]
        """Any YAML document compiles or raises PolicyError with a location."""
        try:
            text = yaml.safe_dump(doc)
        except yaml.YAMLError:
            return
        try:
            parse_policy(text, source="fuzz.yaml")
        except PolicyError as exc:
            assert str(exc).startswith("fuzz.yaml")  # noqa: PT017 - a property over any outcome

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300))
    def test_arbitrary_text(self, text: str) -> None:
        """Arbitrary text compiles or raises PolicyError, never another exception."""
        with contextlib.suppress(PolicyError):
            parse_policy(text, source="t.yaml")

    def test_aliases_refused(self) -> None:
        """YAML aliases (billion-laughs expansion) are refused with a location."""
        with pytest.raises(PolicyError, match="aliases"):
            parse_policy("version: 1\nx: &a [1, 2]\nrules: *a\n", source="a.yaml")

    def test_nan_threshold_refused(self) -> None:
        """A NaN threshold (which would never match) is refused."""
        with pytest.raises(PolicyError, match="finite"):
            parse_policy("version: 1\nrules:\n  - id: a\n    action: block\n    when: {ood.knn: {gte: .nan}}\n",
                         source="n.yaml")
