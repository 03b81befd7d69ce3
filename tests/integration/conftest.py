"""Fixtures the integration tests share: the demo model server, a profile fitted on the digits data."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from guard_agent.demo import DigitsModel, make_model_app
from tests._support.servers import serve_app
from tests.conftest import DigitsData


@pytest.fixture(scope="session")
def demo_model() -> DigitsModel:
    """The demo's digits model, fitted once (it is deterministic and never changed by a test)."""
    return DigitsModel()


@pytest.fixture
async def demo_model_url(demo_model: DigitsModel) -> AsyncIterator[str]:
    """The built-in digits v2 model server (``guard_agent.demo``) on a free loopback port."""
    async with serve_app(make_model_app(demo_model)) as url:
        yield url


@pytest.fixture(scope="session")
def digits_profile(tmp_path_factory: pytest.TempPathFactory, digits: DigitsData) -> str:
    """A profile with detectors and session trackers fitted on the digits training split (read-only)."""
    from detectors import fit_profile, save_profile
    from detectors.trackers import fit_tracker_config

    out = tmp_path_factory.mktemp("profile") / "digits"
    trackers = fit_tracker_config(digits.X_train, digits.y_train, seed=0).to_parts()
    save_profile(fit_profile(digits.X_train, labels=digits.y_train, fpr=0.01, seed=0,
                             extra_components={"trackers": trackers}), out)
    return str(out)

