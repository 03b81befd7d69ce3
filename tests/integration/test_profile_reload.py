"""Profile hot reload: a new profile is verified then swapped in; a corrupt one never replaces the last good."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests._support.waiting import wait_for
from tests.conftest import DigitsData, ModelServer, v2_body

pytestmark = pytest.mark.slow


def fit_to(directory: Path, X: np.ndarray, seed: int) -> None:
    from detectors import fit_profile, save_profile

    save_profile(fit_profile(X, fpr=0.01, seed=seed), directory, force=True)


class TestProfileReload:
    async def test_new_profile_swapped_corrupt_refused(self, tmp_path: Path, mlserver: ModelServer, start_guard,
                                                       digits: DigitsData) -> None:
        """A replaced profile becomes active (events carry its revision); a tampered array is refused and the
        last good profile keeps scoring."""
        live = tmp_path / "profile"
        fit_to(live, digits.X_train, seed=0)
        guard = await start_guard(mlserver.url, profile=str(live))
        first = guard.state.profile.revision
        staged = tmp_path / "staged"
        fit_to(staged, digits.X_train[::-1], seed=1)
        for f in staged.iterdir():  # the array files first, profile.json last, as an operator would
            if f.name != "profile.json":
                shutil.copy(f, live / f.name)
        shutil.copy(staged / "profile.json", live / "profile.json")
        assert await wait_for(lambda: guard.state.profile.revision not in (None, first))
        second = guard.state.profile.revision

        npz = next(f for f in live.iterdir() if f.suffix == ".npz")
        data = bytearray(npz.read_bytes())
        data[-100] ^= 0xFF
        npz.write_bytes(bytes(data))
        (live / "profile.json").write_bytes((live / "profile.json").read_bytes() + b"\n")
        assert await wait_for(lambda: any(e["message"].startswith("profile rejected") for e in guard.events))
        assert guard.state.profile.revision == second
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_profile_reloads_total", {"result": "failed"}) == 1
        async with aiohttp.ClientSession() as http, http.post(
                guard.url + "/v2/models/digits/infer", data=v2_body(digits.X_test[0]),
                headers={"Content-Type": "application/json", "X-Request-Id": "after"}) as r:
            assert r.status == 200
        (event,) = guard.events_for("after")
        assert event["guard"]["profile_revision"] == second
        assert "ood.combined" in event["guard"]["scores"]


class TestPerModelProfiles:
    def test_kubelet_dot_entries_are_not_models(self, tmp_path: Path, digits: DigitsData) -> None:
        """In a mounted per-model directory, the kubelet's ..data and ..<timestamp> entries are not models."""
        from guard_agent.profiles import ProfileStore

        root = tmp_path / "profiles"
        version = root / "..2026_11_29"
        fit_to(version / "digits", digits.X_train, seed=0)
        (root / "..data").symlink_to(version.name)
        (root / "digits").symlink_to("..data/digits")
        store = ProfileStore(str(root))
        assert set(store.profiles) == {"digits"}
        assert store.profile_for(None) is store.profiles["digits"]
