"""The checker's wiring into the guard: configuration errors at start, the score it hands to decide()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard_agent.app import build_state
from guard_agent.events import CallbackSink
from guard_agent.integrity import CanarySet, IntegrityChecker, save_canaries
from guard_agent.settings import ConfigError, Settings


def canaries(directory: Path, model: str = "digits") -> Path:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    save_canaries(CanarySet(model=model, inputs=np.eye(2), labels=np.array([0, 1]), probabilities=probs,
                            kinds=("prototype", "prototype")), directory)
    return directory


def state_for(**settings: object):  # type: ignore[no-untyped-def]
    lines: list[bytes] = []
    return build_state(Settings(hmac_key="k", **settings), sink=CallbackSink(lines.append))  # type: ignore[arg-type]


class TestConfiguration:
    def test_nothing_configured_means_no_checker(self) -> None:
        """Without canaries or a model directory the seam stays the no-op and the score is not offered."""
        state = state_for()
        assert not isinstance(state.integrity, IntegrityChecker)
        assert "integrity.canary" not in state.available_scores()

    def test_canaries_make_the_score_available(self, tmp_path: Path) -> None:
        """With a canary set the checker is installed and rules may name integrity.canary."""
        state = state_for(canaries=str(canaries(tmp_path / "c")))
        assert isinstance(state.integrity, IntegrityChecker)
        assert "integrity.canary" in state.available_scores()
        assert state.integrity.revisions["digits"]

    @pytest.mark.parametrize(("settings", "match"), [
        ({"canaries": "/nonexistent/canaries"}, "no canaries.json"),
        ({"model_dir": "/tmp"}, "model_public_key_file"),
        ({"model_dir": "/nonexistent/model", "model_public_key_file": "/dev/null"}, "not a directory"),
    ])
    def test_bad_configuration_stops_the_start(self, settings: dict[str, str], match: str) -> None:
        """A missing canary set, a model directory without a key, or a missing directory is a config error."""
        with pytest.raises(ConfigError, match=match):
            state_for(**settings)

    def test_unreadable_public_key(self, tmp_path: Path) -> None:
        """A public key that is not Ed25519 PEM is refused at start, naming the setting."""
        (tmp_path / "pub").write_text("not a key")
        with pytest.raises(ConfigError, match="model_public_key_file"):
            state_for(model_dir=str(tmp_path), model_public_key_file=str(tmp_path / "pub"))


class TestScore:
    @pytest.fixture
    def checker(self, tmp_path: Path) -> IntegrityChecker:
        key = Ed25519PrivateKey.generate().public_key()
        pub = tmp_path / "pub.pem"
        pub.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (tmp_path / "model").mkdir()
        state = state_for(canaries=str(canaries(tmp_path / "c")), model_dir=str(tmp_path / "model"),
                          model_public_key_file=str(pub))
        assert isinstance(state.integrity, IntegrityChecker)
        return state.integrity

    @pytest.mark.parametrize(("canary", "signature", "model", "expected"), [
        (None, None, "digits", None),   # nothing checked yet
        (True, None, "digits", 0.0),
        (False, None, "digits", 1.0),
        (True, False, "digits", 1.0),   # tampered files fail every model
        (None, False, "other", 1.0),
        (None, True, "other", 0.0),
        (True, None, "other", None),    # a model without canaries is not vouched for
        (False, None, None, 1.0),       # a route naming no model, in front of the one checked model
    ])
    def test_score_table(self, checker: IntegrityChecker, canary: bool | None, signature: bool | None,
                         model: str | None, expected: float | None) -> None:
        """1.0 when any check failed for the model, 0.0 when one passed, None when nothing is known."""
        if canary is not None:
            checker._passing["digits"] = canary
        checker._signature_ok = signature
        assert checker.score(model) == expected
