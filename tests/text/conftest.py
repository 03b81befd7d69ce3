"""Text fixtures: the fortunes corpus (Debian packages fortunes, fortunes-bofh-excuses; .ci/run installs them)
and a text profile fitted on it once per session."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from detectors import Profile, save_profile
from detectors.text import fit_text_profile
from guard_agent.attacks._text_data import labelled_fortunes
from tests.integration.conftest import redis_prefix  # noqa: F401 (the fixture: shared Redis under our own prefix)


@dataclass(frozen=True)
class TextData:
    train: list[str]
    test: list[str]
    y_train: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def fortunes() -> TextData:
    """Four fortune collections (computers, politics, science, work), split 70/30, stratified."""
    texts, labels = labelled_fortunes()
    tr, te, ytr, yte = train_test_split(texts, labels, test_size=0.3, random_state=0, stratify=labels)
    return TextData(tr, te, np.asarray(ytr), np.asarray(yte))


@pytest.fixture(scope="session")
def text_profile(fortunes: TextData) -> Profile:
    """A text profile fitted on the training texts (projection, checks, detectors, trackers)."""
    profile, _ = fit_text_profile(fortunes.train, labels=fortunes.y_train, seed=0)
    return profile


@pytest.fixture(scope="session")
def text_profile_dir(text_profile: Profile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text-profile")
    save_profile(text_profile, out, force=True)
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server the test started (by its own handle), killing it if it does not exit in 15 s."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
