"""SessionState: encode/decode round trips, bounded size, purity of updates, strict decoding."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.trackers import SessionTrackers, TrackerConfig

from .conftest import SALT, Digits

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _feed(trackers: SessionTrackers, rows: np.ndarray, labels: list[int], t0: float = 0.0):  # type: ignore[no-untyped-def]
    state = trackers.new_state()
    for i in range(rows.shape[0]):
        state, _ = trackers.update(state, rows[i : i + 1], np.array([labels[i % len(labels)]]), None, t0 + i)
    return state


class TestCodec:
    @_SETTINGS
    @given(
        n=st.integers(0, 160),
        seed=st.integers(0, 2**31 - 1),
        labels=st.lists(st.integers(0, 9), min_size=1, max_size=5),
        t0=st.floats(0, 1e9),
    )
    def test_round_trip(self, trackers: SessionTrackers, digits: Digits, n: int, seed: int, labels: list[int],
                        t0: float) -> None:
        """decode(encode(s)) re-encodes to the same bytes and gives the same scores and next update."""
        rng = np.random.default_rng(seed)
        rows = digits.X_held[rng.integers(len(digits.X_held), size=n)] + rng.integers(0, 2, size=(n, 64))
        state = _feed(trackers, rows, labels, t0)
        blob = trackers.encode(state)
        back = trackers.decode(blob)
        assert trackers.encode(back) == blob
        assert trackers.peek(back, t0 + n + 5) == trackers.peek(state, t0 + n + 5)
        x = digits.X_held[:1]
        after_back = trackers.update(back, x, None, None, t0 + n + 1)[1]
        assert after_back == trackers.update(state, x, None, None, t0 + n + 1)[1]

    def test_size_is_bounded_after_10k_updates(self, trackers: SessionTrackers) -> None:
        """After 10,000 distinct queries the state is exactly as large as a fresh one, and under 6.5 KiB (2 KiB of
        it the last 16 inputs of 64 features at half precision, for the gradient-step test)."""
        rng = np.random.default_rng(7)
        state = trackers.new_state()
        empty = len(trackers.encode(state))
        X = rng.uniform(0, 16, size=(10_000, 64))
        for i in range(0, 10_000, 100):
            state, _ = trackers.update(state, X[i : i + 100], rng.integers(10, size=100), None, float(i))
        assert state.n_queries == 10_000
        assert len(trackers.encode(state)) == empty == trackers.state_nbytes(state)
        assert empty <= 6656

    def test_update_does_not_modify_its_input(self, trackers: SessionTrackers, digits: Digits) -> None:
        """update is pure: the state passed in encodes to the same bytes afterwards."""
        state = _feed(trackers, digits.X_held[:30], [1, 2])
        before = trackers.encode(state)
        trackers.update(state, digits.X_held[30:40], None, None, 100.0)
        assert trackers.encode(state) == before


_CORRUPT_BASE: dict[str, bytes] = {}


def _base_blob(trackers: SessionTrackers, digits: Digits) -> bytes:
    """A state with every ring partly filled (computed once)."""
    rows = digits.X_held[:150] + np.random.default_rng(0).integers(0, 2, size=(150, 64))
    _CORRUPT_BASE["blob"] = trackers.encode(_feed(trackers, rows, [0, 3, 7]))
    return _CORRUPT_BASE["blob"]


class TestDecodeRejects:
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(blob=st.binary(max_size=5000))
    def test_random_bytes(self, trackers: SessionTrackers, blob: bytes) -> None:
        """Arbitrary bytes never decode (the length, magic and layout tag must all match)."""
        with pytest.raises(ValueError, match=r"bytes|state"):
            trackers.decode(blob)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 40))
    def test_corrupted_valid_states(self, trackers: SessionTrackers, digits: Digits, seed: int, flips: int) -> None:
        """A valid state with random bytes overwritten (header kept) either decodes to a state that
        updates and scores in range, or raises ValueError; nothing else escapes."""
        rng = np.random.default_rng(seed)
        blob = bytearray(_CORRUPT_BASE.get("blob") or _base_blob(trackers, digits))
        for pos in rng.integers(12, len(blob), size=flips):
            blob[int(pos)] = int(rng.integers(256))
        try:
            state = trackers.decode(bytes(blob))
        except ValueError:
            return
        _, scores = trackers.update(state, digits.X_held[:3], None, None, 1e6)
        assert all(0.0 <= v <= 1.0 for v in scores.values())

    def test_truncated_and_extended(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A valid state with one byte missing or added is refused."""
        blob = trackers.encode(_feed(trackers, digits.X_held[:20], [0]))
        for bad in (blob[:-1], blob + b"\0", b""):
            with pytest.raises(ValueError, match="bytes"):
                trackers.decode(bad)

    def test_other_layout(self, config: TrackerConfig, digits: Digits) -> None:
        """A state written by trackers with other ring sizes is refused, even at the same length."""
        other = SessionTrackers(dataclasses.replace(config, ring_fp=config.ring_fp + 1), salt=SALT)
        blob = other.encode(other.new_state())
        mine = SessionTrackers(config, salt=SALT)
        with pytest.raises(ValueError, match=r"bytes|layout"):
            mine.decode(blob)
        forged = blob[:8] + struct.pack("<I", config.layout_id) + blob[12:]
        with pytest.raises(ValueError, match=r"bytes|layout"):
            mine.decode(forged)

    @pytest.mark.parametrize(
        ("field", "value"),
        [("s_risk_nan", float("nan")), ("s_coverage", -1.0), ("rate_level", float("inf")), ("last_w", 2.0)],
    )
    def test_out_of_range_scalars(self, trackers: SessionTrackers, field: str, value: float) -> None:
        """NaN, negative or infinite evidence and out-of-range W are refused."""
        state = trackers.new_state()
        name = "s_joint" if field == "s_risk_nan" else field
        setattr(state, name, value)
        with pytest.raises(ValueError, match="state"):
            trackers.decode(trackers.encode(state))

    def test_out_of_range_counters_and_arrays(self, trackers: SessionTrackers) -> None:
        """Ring counters past their capacity, inconsistent totals, bad class slots and NaN arrays are refused."""
        cfg = trackers.config
        cases = [
            {"n_fp": cfg.ring_fp + 1},
            {"head_nn": cfg.ring_nn},
            {"n_queries": 3},
            {"n_pool_total": -1},
        ]
        for changes in cases:
            state = dataclasses.replace(trackers.new_state(), **changes)
            with pytest.raises(ValueError, match="state"):
                trackers.decode(trackers.encode(state))
        state = trackers.new_state()
        state.prada_cls[0] = cfg.n_class_slots
        with pytest.raises(ValueError, match="class slots"):
            trackers.decode(trackers.encode(state))
        state = trackers.new_state()
        state.nn[0, 0] = np.nan
        with pytest.raises(ValueError, match="finite"):
            trackers.decode(trackers.encode(state))


class TestCopy:
    def test_copy_is_deep_and_complete(self, trackers: SessionTrackers, digits: Digits) -> None:
        """copy() (written out field by field) carries every dataclass field: equal encoding, and no array
        shared with the original, so an update of the copy cannot change the original."""
        state = _feed(trackers, digits.X_held[:40], [1, 2, 3])
        clone = state.copy()
        for f in dataclasses.fields(state):
            mine, theirs = getattr(state, f.name), getattr(clone, f.name)
            if isinstance(mine, np.ndarray):
                assert theirs is not mine and np.array_equal(theirs, mine) and theirs.dtype == mine.dtype, f.name
            else:
                assert theirs == mine or (mine != mine and theirs != theirs), f.name  # NaN times compare unequal
        assert trackers.encode(clone) == trackers.encode(state)
        before = trackers.encode(state)
        trackers.update(clone, digits.X_held[40:41], np.array([4]), None, 100.0)
        clone.fp[:] = 0
        assert trackers.encode(state) == before
