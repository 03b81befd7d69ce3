"""Response parsing and hardening, on bodies produced by real MLServer code and on v1/MLflow forms."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import orjson
import pytest
from mlserver.codecs import NumpyRequestCodec
from mlserver.codecs.json import encode_to_json_bytes
from mlserver.settings import ModelSettings
from mlserver.types import RequestOutput
from mlserver_sklearn import SKLearnModel
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from guard_agent.protocols import Hardening, harden_response, parse_request, parse_response

ROWS = 5


def output(name: str, shape: list[int], datatype: str, data: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


class Digits:
    """A scikit-learn classifier served by MLServer's own SKLearnModel (in process, no pickle)."""

    def __init__(self) -> None:
        x, y = load_digits(return_X_y=True)
        self.x = x[-ROWS:]
        self.clf = LogisticRegression(max_iter=300).fit(x[:600], y[:600])
        self.model = SKLearnModel(ModelSettings(name="digits", implementation=SKLearnModel))
        self.model._model = self.clf

    def request_body(self, outputs: tuple[str, ...] = ()) -> bytes:
        req = NumpyRequestCodec.encode_request(self.x)
        if outputs:
            req.outputs = [RequestOutput(name=o) for o in outputs]
        return bytes(encode_to_json_bytes(req.model_dump(exclude_unset=True, exclude_none=True)))

    def response_body(self, *outputs: str) -> bytes:
        req = NumpyRequestCodec.encode_request(self.x)
        req.outputs = [RequestOutput(name=o) for o in outputs]
        resp = asyncio.run(self.model.predict(req))
        # What MLServer's REST layer sends: exclude_unset and exclude_none, its own JSON encoder.
        return bytes(encode_to_json_bytes(resp.model_dump(exclude_unset=True, exclude_none=True)))


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


class TestMLServerShapes:
    def test_request_encoded_by_mlserver_parses(self, digits: Digits) -> None:
        """A request built by MLServer's NumpyRequestCodec parses to exactly the same features."""
        r = parse_request("v2", digits.request_body(("predict_proba",)), content_type="application/json",
                          content_encoding=None)
        np.testing.assert_array_equal(r.features, digits.x)
        assert r.requested_outputs == ("predict_proba",)
        assert r.row_shape == (64,)

    def test_predict_proba_response(self, digits: Digits) -> None:
        """predict_proba gives (rows, 10) probabilities and labels as their argmax."""
        parsed = parse_response("v2", digits.response_body("predict_proba"), ROWS)
        assert parsed is not None
        assert parsed.probabilities is not None
        assert parsed.labels is not None
        np.testing.assert_allclose(parsed.probabilities, digits.clf.predict_proba(digits.x))
        np.testing.assert_array_equal(parsed.labels, digits.clf.predict(digits.x))
        assert parsed.labels.dtype == np.int64

    def test_predict_response(self, digits: Digits) -> None:
        """predict gives integer labels and no probabilities."""
        parsed = parse_response("v2", digits.response_body("predict"), ROWS)
        assert parsed is not None
        assert parsed.probabilities is None
        assert parsed.labels is not None
        np.testing.assert_array_equal(parsed.labels, digits.clf.predict(digits.x))

    def test_both_outputs(self, digits: Digits) -> None:
        """With both outputs, labels come from predict and probabilities from predict_proba."""
        parsed = parse_response("v2", digits.response_body("predict", "predict_proba"), ROWS)
        assert parsed is not None
        assert parsed.probabilities is not None
        assert parsed.probabilities.shape == (ROWS, 10)
        np.testing.assert_array_equal(parsed.labels, digits.clf.predict(digits.x))

    def test_row_count_mismatch_gives_no_prediction(self, digits: Digits) -> None:
        """An answer for a different number of rows is not attributed to this request."""
        parsed = parse_response("v2", digits.response_body("predict_proba"), ROWS + 1)
        assert parsed is not None
        assert parsed.labels is None
        assert parsed.probabilities is None


class TestParseResponse:
    @pytest.mark.parametrize(
        ("protocol", "doc", "labels", "probs"),
        [
            ("v1", {"predictions": [3, 1]}, [3, 1], None),
            ("v1", {"predictions": [[0.1, 0.9], [0.8, 0.2]]}, [1, 0], [[0.1, 0.9], [0.8, 0.2]]),
            ("v1", {"predictions": [[2], [0]]}, [2, 0], None),
            ("v1", {"predictions": [{"probabilities": [0.3, 0.7], "classes": 1},
                                    {"probabilities": [0.6, 0.4], "classes": 0}]},
             [1, 0], [[0.3, 0.7], [0.6, 0.4]]),
            ("v1", {"outputs": [[0.2, 0.8], [0.9, 0.1]]}, [1, 0], [[0.2, 0.8], [0.9, 0.1]]),
            ("v1", {"outputs": {"scores": [[0.2, 0.8], [0.9, 0.1]], "classes": [1, 0]}}, [1, 0],
             [[0.2, 0.8], [0.9, 0.1]]),
            ("mlflow", {"predictions": [0, 2]}, [0, 2], None),
            ("mlflow", [0, 2], [0, 2], None),
            ("mlflow", {"predictions": [{"0": 0.25, "1": 0.75}, {"0": 0.5, "1": 0.5}]}, [1, 0],
             [[0.25, 0.75], [0.5, 0.5]]),
            ("mlflow", {"predictions": {"label": [1, 1], "proba": [[0.4, 0.6], [0.1, 0.9]]}}, [1, 1],
             [[0.4, 0.6], [0.1, 0.9]]),
            ("v2", {"outputs": [output("p", [2], "INT32", [4, 5])]}, [4, 5], None),
            ("v2", {"outputs": [output("p", [2, 2], "FP32", [[0.5, 0.5], [0, 1]])]}, [0, 1],
             [[0.5, 0.5], [0, 1]]),
        ],
    )
    def test_forms(self, protocol: str, doc: Any, labels: list[int] | None,
                   probs: list[list[float]] | None) -> None:
        """Each known response form yields the expected labels and probabilities."""
        parsed = parse_response(protocol, json.dumps(doc).encode(), 2)
        assert parsed is not None
        if labels is None:
            assert parsed.labels is None
        else:
            assert parsed.labels is not None
            assert parsed.labels.tolist() == labels
        if probs is None:
            assert parsed.probabilities is None
        else:
            np.testing.assert_allclose(np.asarray(parsed.probabilities), probs)

    @pytest.mark.parametrize(
        ("protocol", "doc"),
        [
            ("v1", {"predictions": [1.5, 2.5]}),
            ("v2", {"outputs": [{"name": "y", "shape": [2, 1], "datatype": "FP64", "data": [1.5, 2.5]}]}),
            ("v2", {"outputs": [{"name": "y", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}),
            ("mlflow", {"predictions": ["cat", "dog"]}),
        ],
    )
    def test_regression_and_strings_give_no_prediction(self, protocol: str, doc: Any) -> None:
        """Regression values and string classes are readable but carry no label/probabilities."""
        parsed = parse_response(protocol, json.dumps(doc).encode(), 2)
        assert parsed is not None
        assert parsed.labels is None
        assert parsed.probabilities is None

    @pytest.mark.parametrize(
        ("protocol", "body"),
        [("v2", b"not json"), ("v2", b'{"outputs": 3}'), ("v2", b"[]"), ("v1", b'{"result": 1}'),
         ("v1", b"\xff"), ("custom", b'{"predictions": [1]}'), ("mlflow", b'"x"')],
    )
    def test_unreadable_is_none(self, protocol: str, body: bytes) -> None:
        """Bodies that are not a known response form give None, never an exception."""
        assert parse_response(protocol, body, 1) is None

    def test_nan_in_response(self) -> None:
        """A NaN literal (not strict JSON) in a response still parses."""
        parsed = parse_response("v1", b'{"predictions": [[NaN, 1.0]]}', 1)
        assert parsed is not None
        assert parsed.probabilities is not None
        assert np.isnan(parsed.probabilities[0, 0])

    @pytest.mark.parametrize("value", ["1e300", "2.5", "NaN", "-Infinity"])
    @pytest.mark.filterwarnings("error::RuntimeWarning")
    def test_integer_output_that_is_not_a_whole_number_gives_no_label(self, value: str) -> None:
        """An INT64 output holding 1e300, a fraction or a non-finite number is no label (no garbage class)."""
        body = f'{{"outputs": [{{"name": "p", "shape": [2], "datatype": "INT64", "data": [3, {value}]}}]}}'
        parsed = parse_response("v2", body.encode(), 2)
        assert parsed is not None and parsed.labels is None
        good = parse_response("v2", body.replace(value, "4.0").encode(), 2)
        assert good is not None and good.labels is not None and good.labels.tolist() == [3, 4]


def proba_of(protocol: str, body: bytes, rows: int) -> np.ndarray:
    parsed = parse_response(protocol, body, rows)
    assert parsed is not None
    assert parsed.probabilities is not None
    return parsed.probabilities


class TestHardening:
    def test_inactive_hardening_returns_body_unchanged(self, digits: Digits) -> None:
        """With nothing to do, the exact bytes are returned."""
        body = digits.response_body("predict_proba")
        assert harden_response("v2", body, Hardening()) is body

    def test_round_digits(self, digits: Digits) -> None:
        """Rounding keeps shape and other fields and leaves at most N decimals."""
        body = digits.response_body("predict_proba", "predict")
        out = harden_response("v2", body, Hardening(round_digits=2))
        assert out is not None
        p = proba_of("v2", out, ROWS)
        np.testing.assert_allclose(p, np.round(digits.clf.predict_proba(digits.x), 2))
        doc, orig = orjson.loads(out), orjson.loads(body)
        assert doc["model_name"] == orig["model_name"]
        assert doc["outputs"][1] == orig["outputs"][1]  # INT64 labels untouched
        assert doc["outputs"][0]["shape"] == [ROWS, 10]

    def test_top_k(self, digits: Digits) -> None:
        """top-k keeps exactly the k largest per row (shape unchanged), so the argmax is unchanged."""
        body = digits.response_body("predict_proba")
        out = harden_response("v2", body, Hardening(top_k=3))
        assert out is not None
        p, orig = proba_of("v2", out, ROWS), digits.clf.predict_proba(digits.x)
        assert p.shape == (ROWS, 10)
        assert ((p != 0).sum(axis=1) <= 3).all()
        np.testing.assert_array_equal(p.argmax(axis=1), orig.argmax(axis=1))
        top3 = np.sort(orig, axis=1)[:, -3:]
        np.testing.assert_allclose(np.sort(p, axis=1)[:, -3:], top3)

    def test_label_only_v2(self, digits: Digits) -> None:
        """label_only turns predict_proba into an INT64 [rows, 1] output of the same name."""
        out = harden_response("v2", digits.response_body("predict_proba"), Hardening(label_only=True))
        assert out is not None
        doc = orjson.loads(out)
        o = doc["outputs"][0]
        assert (o["name"], o["datatype"], o["shape"]) == ("predict_proba", "INT64", [ROWS, 1])
        parsed = parse_response("v2", out, ROWS)
        assert parsed is not None
        assert parsed.probabilities is None
        np.testing.assert_array_equal(np.asarray(parsed.labels), digits.clf.predict(digits.x))

    @pytest.mark.parametrize("protocol", ["v1", "mlflow"])
    def test_v1_and_mlflow_matrix(self, protocol: str) -> None:
        """v1/MLflow probability rows: top-k and round in place; label_only gives a list of ints."""
        body = json.dumps({"predictions": [[0.123, 0.456, 0.421], [0.7, 0.2, 0.1]]}).encode()
        out = harden_response(protocol, body, Hardening(top_k=2, round_digits=1))
        assert out is not None
        assert orjson.loads(out) == {"predictions": [[0.0, 0.5, 0.4], [0.7, 0.2, 0.0]]}
        out = harden_response(protocol, body, Hardening(label_only=True))
        assert out is not None
        assert orjson.loads(out) == {"predictions": [1, 0]}

    def test_tf_rows_with_named_outputs(self) -> None:
        """Per-row objects: probability lists are hardened, integer fields kept."""
        body = json.dumps({"predictions": [{"probabilities": [0.26, 0.74], "classes": 1}]}).encode()
        out = harden_response("v1", body, Hardening(round_digits=1))
        assert out is not None
        assert orjson.loads(out) == {"predictions": [{"probabilities": [0.3, 0.7], "classes": 1}]}
        out = harden_response("v1", body, Hardening(label_only=True))
        assert out is not None
        assert orjson.loads(out) == {"predictions": [{"probabilities": 1, "classes": 1}]}

    def test_mlflow_records_and_bare_list(self) -> None:
        """MLflow records of per-class floats and MLflow 1.x bare lists are hardened too."""
        records = json.dumps({"predictions": [{"a": 0.21, "b": 0.79}]}).encode()
        out = harden_response("mlflow", records, Hardening(label_only=True))
        assert out is not None
        assert orjson.loads(out) == {"predictions": [1]}
        bare = json.dumps([[0.333, 0.667]]).encode()
        out = harden_response("mlflow", bare, Hardening(round_digits=1))
        assert out is not None
        assert orjson.loads(out) == [[0.3, 0.7]]

    def test_rounding_applies_to_single_scores(self) -> None:
        """A single-score column (binary classifier / regression) is rounded but not relabelled."""
        body = json.dumps({"outputs": [output("s", [2, 1], "FP32", [0.123, 0.987])]})
        out = harden_response("v2", body.encode(), Hardening(round_digits=1, label_only=True))
        assert out is not None
        assert orjson.loads(out)["outputs"][0]["data"] == [0.1, 1.0]

    def test_labels_and_strings_untouched(self) -> None:
        """Integer labels and class names are left exactly as they were."""
        body = json.dumps({"predictions": ["cat", "dog"], "model": "x"}).encode()
        out = harden_response("mlflow", body, Hardening(round_digits=0, top_k=1))
        assert out is not None
        assert orjson.loads(out) == {"predictions": ["cat", "dog"], "model": "x"}

    @pytest.mark.parametrize(
        ("protocol", "body"),
        [
            ("v2", b"not json"),
            ("v2", b'{"outputs": [{"name": "p", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]}'),
            ("v2", b'{"outputs": ["x"]}'),
            ("v2", b'{"result": []}'),
            ("v1", b'{"result": []}'),
            ("v1", b'{"predictions": [[0.1, "x"], [1]]}'),
            ("custom", b'{"predictions": [[0.5, 0.5]]}'),
        ],
    )
    def test_cannot_rewrite_is_none(self, protocol: str, body: bytes) -> None:
        """A body whose probabilities cannot be found or rewritten gives None (caller decides)."""
        assert harden_response(protocol, body, Hardening(round_digits=2)) is None

    def test_top_k_below_one_acts_as_one(self) -> None:
        """top_k=0 keeps the single largest score rather than zeroing everything."""
        out = harden_response("v1", b'{"predictions": [[0.2, 0.8]]}', Hardening(top_k=0))
        assert out is not None
        assert orjson.loads(out) == {"predictions": [[0.0, 0.8]]}
