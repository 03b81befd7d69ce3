"""The canary set format: round trip, hash pinning, no pickle, all-or-nothing directory loads."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from guard_agent.integrity import CanaryError, CanarySet, load_canaries, load_canary_dir, save_canaries


def make_set(model: str = "m", n: int = 6, k: int = 3, seed: int = 0) -> CanarySet:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), size=n)
    return CanarySet(model=model, inputs=rng.normal(size=(n, 4)), labels=np.argmax(probs, axis=1),
                     probabilities=probs, kinds=("sample",) * (n - 2) + ("prototype", "boundary"),
                     metadata={"name": model, "versions": ["1"]}, probability_atol=1e-4)


class TestRoundTrip:
    def test_saved_set_loads_identically(self, tmp_path: Path) -> None:
        """Inputs, answers, kinds, tolerance and metadata survive save/load; arrays come back read-only."""
        cs = make_set()
        revision = save_canaries(cs, tmp_path)
        back = load_canaries(tmp_path)
        np.testing.assert_array_equal(back.inputs, cs.inputs)
        assert back.labels is not None
        np.testing.assert_array_equal(back.labels, cs.labels)
        assert back.probabilities is not None
        np.testing.assert_array_equal(back.probabilities, cs.probabilities)
        assert back.kinds == cs.kinds
        assert back.probability_atol == 1e-4
        assert back.metadata == {"name": "m", "versions": ["1"]}
        assert back.revision == revision == hashlib.sha256((tmp_path / "canaries.json").read_bytes()).hexdigest()
        assert not back.inputs.flags.writeable

    def test_same_set_same_revision(self, tmp_path: Path) -> None:
        """Saving the same set twice gives byte-identical files (a stable revision)."""
        a = save_canaries(make_set(), tmp_path / "a")
        b = save_canaries(make_set(), tmp_path / "b")
        assert a == b
        assert (tmp_path / "a" / "canaries.npz").read_bytes() == (tmp_path / "b" / "canaries.npz").read_bytes()

    def test_refuses_to_overwrite_without_force(self, tmp_path: Path) -> None:
        """An existing set is only replaced with force=True."""
        save_canaries(make_set(), tmp_path)
        with pytest.raises(CanaryError, match="force"):
            save_canaries(make_set(seed=1), tmp_path)
        save_canaries(make_set(seed=1), tmp_path, force=True)
        assert load_canaries(tmp_path).inputs[0, 0] == make_set(seed=1).inputs[0, 0]


class TestRefused:
    def test_modified_array_refused(self, tmp_path: Path) -> None:
        """One changed byte in the npz no longer matches the pinned sha256."""
        save_canaries(make_set(), tmp_path)
        npz = tmp_path / "canaries.npz"
        data = bytearray(npz.read_bytes())
        data[-50] ^= 0x01
        npz.write_bytes(bytes(data))
        with pytest.raises(CanaryError, match="sha256"):
            load_canaries(tmp_path)

    def test_pickled_array_refused_even_with_matching_hash(self, tmp_path: Path) -> None:
        """An object array (pickle inside the npz) is refused by np.load(allow_pickle=False)."""
        save_canaries(make_set(), tmp_path)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array([{"x": 1}], dtype=object), allow_pickle=True)
            zf.writestr("inputs.npy", member.getvalue())
        blob = buf.getvalue()
        (tmp_path / "canaries.npz").write_bytes(blob)
        doc = json.loads((tmp_path / "canaries.json").read_text())
        doc["arrays"]["sha256"] = hashlib.sha256(blob).hexdigest()
        (tmp_path / "canaries.json").write_text(json.dumps(doc))
        with pytest.raises(CanaryError, match="pickle"):
            load_canaries(tmp_path)

    @pytest.mark.parametrize(("field", "value", "match"), [
        ("format", "something-else", "not a canary set"),
        ("schema_version", 99, "schema_version"),
        ("count", 5, "count"),
        ("protocol", "grpc", "protocol"),
        ("model", "../etc", "plain name"),
        ("kinds", ["sample"] * 5, "kinds"),
        ("kinds", ["weird"] * 6, "kinds"),
        ("tolerance", {"probability_atol": -1}, "probability_atol"),
    ])
    def test_bad_fields_named(self, tmp_path: Path, field: str, value: object, match: str) -> None:
        """Each malformed field is refused with a message naming it."""
        save_canaries(make_set(), tmp_path)
        doc = json.loads((tmp_path / "canaries.json").read_text())
        doc[field] = value
        (tmp_path / "canaries.json").write_text(json.dumps(doc))
        with pytest.raises(CanaryError, match=match):
            load_canaries(tmp_path)

    def test_answers_required(self) -> None:
        """A set with neither labels nor probabilities cannot check anything and is refused."""
        cs = make_set()
        bare = CanarySet(model="m", inputs=cs.inputs, labels=None, probabilities=None, kinds=cs.kinds)
        with pytest.raises(CanaryError, match="labels, probabilities"):
            save_canaries(bare, "/nonexistent-never-written")


class TestDirectory:
    def test_one_set_or_a_directory_of_sets(self, tmp_path: Path) -> None:
        """A directory holding canaries.json is one set; otherwise each subdirectory with one is a set."""
        save_canaries(make_set("a"), tmp_path / "sets" / "a-v1")
        save_canaries(make_set("a", seed=2), tmp_path / "sets" / "a-v2")
        save_canaries(make_set("b"), tmp_path / "sets" / "b")
        (tmp_path / "sets" / "..data").mkdir()  # kubelet bookkeeping is not a set
        sets = load_canary_dir(tmp_path / "sets")
        assert [cs.model for cs in sets] == ["a", "a", "b"]
        assert len(load_canary_dir(tmp_path / "sets" / "b")) == 1

    def test_one_bad_set_fails_the_whole_load(self, tmp_path: Path) -> None:
        """All or nothing: a reload never activates half of the sets."""
        save_canaries(make_set("a"), tmp_path / "a")
        save_canaries(make_set("b"), tmp_path / "b")
        (tmp_path / "b" / "canaries.npz").write_bytes(b"garbage")
        with pytest.raises(CanaryError, match="b"):
            load_canary_dir(tmp_path)

    def test_empty_directory_refused(self, tmp_path: Path) -> None:
        """No set at all is an error, not an empty check."""
        with pytest.raises(CanaryError, match=r"no canaries\.json"):
            load_canary_dir(tmp_path)
