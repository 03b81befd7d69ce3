"""Decision capture: the writer thread, rotation, policy lines, sealed features, exact scores."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from guard_agent.capture import CaptureWriter, make_capture
from guard_agent.events import build_decision_event
from guard_agent.settings import Settings
from guard_agent.tuning import read_capture
from guard_agent.tuning.sealing import SealError, derive_key, open_features, seal_features


def fields(request_id: str, *, score: float = 0.5, revision: str = "rev-a", action: str = "allow") -> dict[str, Any]:
    """An inference decision event the way guard_agent.proxy.handler builds it."""
    return build_decision_event(
        action=action, outcome="success", rule="default", mode="enforce", enforced=True, session="s" * 32,
        model="digits", rows=1, scores={"ood.combined": score}, policy_revision=revision, profile_revision="p",
        request_id=request_id, method="POST", status=200, path="/v2/models/digits/infer", source_ip="10.0.0.1",
        technique=None, started=time.perf_counter(),
        extra_guard={"protocol": "v2", "body_bytes": 100, "features": 4, "session_source": "header",
                     "session_queries": 0, "session_age_seconds": 0.0},
    )


def policy_line(revision: str) -> bytes:
    return orjson.dumps({"capture": {"v": 1, "kind": "policy", "revision": revision,
                                     "document": {"version": 1, "rules": []}, "available_scores": ["ood.combined"]}})


def lines(directory: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        out += [orjson.loads(x) for x in path.read_bytes().splitlines()]
    return out


class TestSealing:
    def test_round_trip(self) -> None:
        """Sealed features open to the same float64 matrix with the same key and request id."""
        key = derive_key("a long random operator secret")
        x = np.random.default_rng(0).normal(size=(3, 5))
        sealed = seal_features(x, key, associated="req-1")
        assert np.array_equal(open_features(sealed, key, associated="req-1"), x)
        assert "ct" in sealed and x.tobytes() not in orjson.dumps(sealed)

    def test_wrong_key_tamper_and_moved_record_fail(self) -> None:
        """A different key, a flipped ciphertext byte or another record's id all refuse to open."""
        key = derive_key("secret one")
        sealed = seal_features(np.ones((1, 4)), key, associated="req-1")
        with pytest.raises(SealError, match="different capture key"):
            open_features(sealed, derive_key("secret two"), associated="req-1")
        with pytest.raises(SealError):
            open_features(sealed, key, associated="req-2")
        ct = bytearray(__import__("base64").b64decode(sealed["ct"]))
        ct[0] ^= 1
        tampered = {**sealed, "ct": __import__("base64").b64encode(bytes(ct)).decode()}
        with pytest.raises(SealError):
            open_features(tampered, key, associated="req-1")

    def test_empty_key_refused(self) -> None:
        """An empty capture key is a configuration mistake, not a key."""
        with pytest.raises(ValueError, match="empty"):
            derive_key("  \n")


class TestCaptureWriter:
    def test_policy_line_precedes_decisions_and_files_are_private(self, tmp_path: Path) -> None:
        """Each revision's policy line comes before its first decision; files are 0600 in a 0700 dir."""
        w = CaptureWriter(tmp_path / "cap", max_bytes=1 << 20, max_files=3, policy_line=policy_line)
        w.record(fields("r1"), np.zeros((1, 4)))
        w.record(fields("r2", revision="rev-b"), np.zeros((1, 4)))
        w.record(fields("r3"), np.zeros((1, 4)))
        w.close()
        kinds = [(d["capture"]["kind"], d["capture"].get("revision") or d["http"]["request"]["id"])
                 for d in lines(tmp_path / "cap")]
        assert kinds == [("policy", "rev-a"), ("decision", "r1"), ("policy", "rev-b"), ("decision", "r2"),
                         ("decision", "r3")]
        (path,) = w.files
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "cap").stat().st_mode) == 0o700

    def test_no_inputs_without_a_key(self, tmp_path: Path) -> None:
        """Without a capture key, no feature values are written, only the event's fields."""
        w = CaptureWriter(tmp_path, max_bytes=1 << 20, max_files=2)
        w.record(fields("r1"), np.full((1, 4), 123.456))
        w.close()
        (doc,) = lines(tmp_path)
        assert "features" not in doc["capture"]
        assert b"123.456" not in next(tmp_path.glob("*.jsonl")).read_bytes()

    def test_sealed_features_round_trip_through_the_reader(self, tmp_path: Path) -> None:
        """With a key, the reader hands back a sealed blob that opens to the request's features."""
        key = derive_key("capture secret")
        x = np.arange(4.0).reshape(1, 4)
        w = CaptureWriter(tmp_path, max_bytes=1 << 20, max_files=2, key=key)
        w.record(fields("r1"), x)
        w.close()
        assert read_capture([tmp_path]).decisions[0].sealed is None  # only kept when asked for
        (d,) = read_capture([tmp_path], with_features=True).decisions
        assert d.sealed is not None
        assert np.array_equal(open_features(d.sealed, key, associated="r1"), x)

    def test_rotation_bounds_size_and_count(self, tmp_path: Path) -> None:
        """Files stay under max_bytes, at most max_files remain, and each starts with its policy line."""
        w = CaptureWriter(tmp_path, max_bytes=4096, max_files=3, policy_line=policy_line)
        for i in range(200):
            w.record(fields(f"r{i}"), None)
        w.close()
        files = sorted(tmp_path.glob("*.jsonl"))
        assert len(files) == 3
        for path in files:
            assert path.stat().st_size <= 4096
            first = orjson.loads(path.read_bytes().splitlines()[0])
            assert first["capture"]["kind"] == "policy"
        ids = [d.request_id for d in read_capture([tmp_path]).decisions]
        assert ids[-1] == "r199" and "r0" not in ids  # the oldest files were deleted

    def test_files_of_an_earlier_run_count_against_the_limit(self, tmp_path: Path) -> None:
        """After a restart the directory still holds at most max_files capture files, newest kept."""
        for run in range(3):
            w = CaptureWriter(tmp_path, max_bytes=4096, max_files=2)
            for i in range(40):
                w.record(fields(f"run{run}-{i}"), None)
            w.close()
            time.sleep(0.01)
        files = sorted(tmp_path.glob("capture-*.jsonl"))
        assert len(files) == 2
        assert read_capture([tmp_path]).decisions[-1].request_id == "run2-39"

    def test_exact_scores_replace_the_rounded_ones(self, tmp_path: Path) -> None:
        """Scores passed by the caller are stored unrounded and flagged exact."""
        w = CaptureWriter(tmp_path, max_bytes=1 << 20, max_files=2)
        f = fields("r1", score=0.99999996)
        assert f["guard"]["scores"]["ood.combined"] == 1.0  # the event rounds to 6 decimals
        w.record(f, None, scores={"ood.combined": 0.99999996})
        w.close()
        (d,) = read_capture([tmp_path]).decisions
        assert d.exact_scores and d.scores["ood.combined"] == 0.99999996
        assert f["guard"]["scores"]["ood.combined"] == 1.0  # the event itself is untouched

    def test_record_never_blocks_when_the_writer_is_stuck(self, tmp_path: Path) -> None:
        """With the writer stalled and the queue full, record() returns at once and counts drops."""
        gate = threading.Event()
        w = CaptureWriter(tmp_path, max_bytes=1 << 20, max_files=2, max_queue=4)
        original = w._write

        def stalled(revision: str, line: bytes) -> None:
            gate.wait(10)
            original(revision, line)

        w._write = stalled  # type: ignore[method-assign]
        t0 = time.perf_counter()
        for i in range(50):
            w.record(fields(f"r{i}"), None)
        elapsed = time.perf_counter() - t0
        gate.set()
        w.close()
        assert elapsed < 0.5
        assert w.dropped >= 40
        assert w.written + w.dropped == 50

    def test_write_failures_drop_and_report_once(self, tmp_path: Path) -> None:
        """When the directory is gone, records are dropped and counted, and the error is reported once."""
        import shutil

        errors: list[str] = []
        drops: list[int] = []
        w = CaptureWriter(tmp_path / "cap", max_bytes=1 << 20, max_files=2, on_error=errors.append,
                          on_drop=lambda: drops.append(1))
        shutil.rmtree(tmp_path / "cap")
        for i in range(10):
            w.record(fields(f"r{i}"), None)
        w.close()
        assert w.dropped == 10 and w.written == 0 and len(drops) == 10
        assert len(errors) == 1 and "capture write failed" in errors[0]

    def test_close_flushes_and_is_idempotent(self, tmp_path: Path) -> None:
        """Everything recorded before close() is on disk after it; a second close() is harmless."""
        w = CaptureWriter(tmp_path, max_bytes=1 << 20, max_files=2)
        for i in range(500):
            w.record(fields(f"r{i}"), None)
        w.close()
        w.close()
        w.record(fields("late"), None)
        assert len(read_capture([tmp_path]).decisions) == 500


class TestMakeCapture:
    def test_none_without_capture_dir(self) -> None:
        """Capture is opt-in: no directory, no hook."""
        from guard_agent.app import build_state
        from guard_agent.events import CallbackSink

        state = build_state(Settings(hmac_key="unit-test-key"), sink=CallbackSink(lambda _: None))
        assert make_capture(state) is None

    def test_hook_from_settings_writes_the_active_policy(self, tmp_path: Path) -> None:
        """With capture_dir and capture_key set, the hook seals features and writes the active policy line."""
        from guard_agent.app import build_state
        from guard_agent.events import CallbackSink

        state = build_state(Settings(hmac_key="unit-test-key", capture_dir=str(tmp_path), capture_key="k" * 32),
                            sink=CallbackSink(lambda _: None))
        hook = state.capture
        assert isinstance(hook, CaptureWriter)
        hook.record(fields("r1", revision=state.policies.current.revision), np.ones((1, 4)))
        hook.close()
        cap = read_capture([tmp_path])
        assert set(cap.policies) == {state.policies.current.revision}
        assert cap.policies[state.policies.current.revision].document["version"] == 1
        assert read_capture([tmp_path], with_features=True).decisions[0].sealed is not None
