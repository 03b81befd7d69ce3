"""Property tests: for any bytes or JSON, parsers return a valid result or refuse cleanly, never crash.

Requests go through ``parse_request_unguarded`` (no last-resort exception net), so a crash here is a
real bug and not hidden by the net in ``parse_request``. Responses go through the inner readers for
the same reason.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from guard_agent.protocols import Hardening, ParsedRequest, ParseLimits, ProtocolError, harden_response
from guard_agent.protocols import hardening as hardening_mod
from guard_agent.protocols import responses as responses_mod
from guard_agent.protocols._dispatch import parse_request_unguarded
from guard_agent.protocols.v2 import DATATYPES

LIMITS = ParseLimits(max_depth=12, max_rows=64, max_features=4096)
PROTOCOLS = ("v2", "v1", "mlflow", "custom")
EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "300"))  # raise it for a longer local fuzz run
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=25,
)
numbers = st.integers(min_value=-300, max_value=300) | st.floats(width=32)
keys = st.sampled_from(["inputs", "instances", "dataframe_split", "dataframe_records", "data", "x",
                        "columns", "outputs", "parameters", "name", "shape", "datatype", "predictions"])


def check_result(r: ParsedRequest) -> None:
    """What every caller relies on: a finite, non-empty, 2-D float64 matrix that agrees with itself."""
    assert isinstance(r, ParsedRequest)
    assert r.features.ndim == 2
    assert r.features.dtype == np.float64
    assert r.rows == r.features.shape[0] >= 1
    assert r.rows <= LIMITS.max_rows
    assert 1 <= r.features.shape[1] <= LIMITS.max_features
    assert math.prod(r.row_shape) == r.features.shape[1]
    assert all(isinstance(n, str) for n in r.input_names + r.requested_outputs)


def attempt(protocol: str, body: bytes, *, content_type: str | None = "application/json",
            header: int | None = None) -> ParsedRequest | None:
    try:
        r = parse_request_unguarded(protocol, body, content_type=content_type, content_encoding=None,
                                    pointer="/data" if protocol == "custom" else None, limits=LIMITS,
                                    inference_header_length=header)
    except ProtocolError as exc:
        message = str(exc)
    else:
        check_result(r)
        return r
    assert message  # a refusal always says why
    return None


@st.composite
def v2_docs(draw: st.DrawFn) -> dict[str, Any]:
    """v2 requests that are often valid: shape and data length agree more often than by chance."""
    inputs = []
    batch = draw(st.integers(0, 3))
    for i in range(draw(st.integers(0, 3))):
        shape = [batch, *draw(st.lists(st.integers(0, 3) | st.just(2**40), max_size=3))]
        datatype = draw(st.sampled_from([*DATATYPES, "BYTES", "fp32", ""]))
        count = min(math.prod(shape), 64) + draw(st.sampled_from([0, 0, 0, 1, -1]))
        elems = st.booleans() if datatype == "BOOL" and draw(st.booleans()) else numbers
        data: Any = draw(st.lists(elems, min_size=max(count, 0), max_size=max(count, 0)))
        if draw(st.booleans()) and len(shape) > 1 and 0 < max(shape) <= 3 and len(data) == math.prod(shape):
            data = np.array(data, dtype=object).reshape(shape).tolist()
        inp: dict[str, Any] = {"name": f"in{i}", "shape": shape, "datatype": datatype, "data": data}
        if draw(st.booleans()):
            inp[draw(keys)] = draw(json_values)
        inputs.append(inp)
    doc: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        doc["outputs"] = [{"name": draw(st.text(max_size=5))}]
    return doc


class TestRequestProperties:
    @FAST
    @given(protocol=st.sampled_from(PROTOCOLS), body=st.binary(max_size=200),
           ctype=st.sampled_from([None, "application/json", "text/csv", "application/octet-stream"]))
    def test_arbitrary_bytes(self, protocol: str, body: bytes, ctype: str | None) -> None:
        """Any bytes: a valid ParsedRequest or a ProtocolError, nothing else."""
        attempt(protocol, body, content_type=ctype)

    @FAST
    @given(protocol=st.sampled_from(PROTOCOLS), doc=st.dictionaries(keys, json_values, max_size=3))
    def test_arbitrary_json(self, protocol: str, doc: dict[str, Any]) -> None:
        """Any JSON object with protocol-ish keys: valid result or ProtocolError."""
        attempt(protocol, json.dumps(doc).encode())

    @FAST
    @given(protocol=st.sampled_from(PROTOCOLS), data=json_values)
    def test_arbitrary_payload_in_the_data_field(self, protocol: str, data: Any) -> None:
        """Any JSON value where each protocol expects its data: valid result or ProtocolError."""
        docs = {"v2": {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": data}]},
                "v1": {"instances": data}, "mlflow": {"dataframe_split": {"data": data}},
                "custom": {"data": data}}
        attempt(protocol, json.dumps(docs[protocol]).encode())

    @FAST
    @given(doc=v2_docs())
    def test_structured_v2(self, doc: dict[str, Any]) -> None:
        """Near-valid v2 requests: valid ones agree with their declared shapes, the rest are refused."""
        r = attempt("v2", json.dumps(doc).encode())
        if r is not None:
            assert r.rows == doc["inputs"][0]["shape"][0]
            assert r.features.shape[1] == sum(math.prod(i["shape"][1:]) for i in doc["inputs"])

    @FAST
    @given(doc=v2_docs(), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
    def test_mutated_bodies(self, doc: dict[str, Any], flips: list[tuple[int, int]]) -> None:
        """Byte-level corruption of a near-valid body never crashes the parser."""
        body = bytearray(json.dumps(doc).encode())
        for pos, byte in flips:
            body[pos % len(body)] = byte
        attempt("v2", bytes(body))

    @FAST
    @given(doc=v2_docs(), tail=st.binary(max_size=64), delta=st.integers(-20, 20), size=st.integers(-2, 64))
    def test_binary_extension(self, doc: dict[str, Any], tail: bytes, delta: int, size: int) -> None:
        """Binary-extension bodies with wrong sizes or lengths: valid result or ProtocolError."""
        for inp in doc["inputs"]:
            inp.pop("data", None)
            inp["parameters"] = {"binary_data_size": size}
        head = json.dumps(doc).encode()
        attempt("v2", head + tail, content_type="application/octet-stream", header=len(head) + delta)

    @FAST
    @given(rows=st.lists(st.lists(st.sampled_from(["1", "-2.5e3", "nan", "x", "", "1e999", '"3"', " 4 "]),
                                  min_size=1, max_size=4), max_size=5))
    def test_csv(self, rows: list[list[str]]) -> None:
        """MLflow CSV bodies of arbitrary cells: valid result or ProtocolError."""
        body = "\n".join(",".join(r) for r in [["a", "b", "c"], *rows]).encode()
        attempt("mlflow", body, content_type="text/csv")


@st.composite
def responses(draw: st.DrawFn) -> Any:
    """Response-like documents: known envelopes around arbitrary or probability-like content."""
    p = draw(st.lists(st.lists(st.floats(0, 1), min_size=2, max_size=4), min_size=1, max_size=3))
    content = draw(st.sampled_from(["json", "probs"]))
    value: Any = draw(json_values) if content == "json" else p
    envelope = draw(st.sampled_from(["v2", "predictions", "outputs", "bare", "records"]))
    if envelope == "v2":
        flat = value if content == "json" else [x for row in p for x in row]
        shape = draw(st.sampled_from([[len(p), len(p[0])], [len(p)], draw(json_values)]))
        return {"outputs": [{"name": "o", "shape": shape, "datatype": draw(st.sampled_from(
            ["FP32", "FP64", "INT64", "BOOL", "BYTES", 3])), "data": flat}]}
    if envelope == "records":
        return {"predictions": [dict(zip("abcd", row, strict=False)) for row in p]}
    return value if envelope == "bare" else {envelope: value}


class TestResponseProperties:
    @FAST
    @given(doc=responses(), rows=st.integers(0, 4))
    def test_readers_never_raise(self, doc: Any, rows: int) -> None:
        """The response readers return a ParsedResponse or None for any document (no exception net)."""
        for parsed in (responses_mod._v2(doc, rows), responses_mod._predictions(doc, rows)):
            if parsed is not None:
                for arr in (parsed.labels, parsed.probabilities):
                    assert arr is None or arr.shape[0] == rows

    @FAST
    @given(doc=responses(), digits=st.none() | st.integers(-2, 6), k=st.none() | st.integers(-1, 5),
           label_only=st.booleans())
    def test_hardeners_only_raise_unreadable(self, doc: Any, digits: int | None, k: int | None,
                                             label_only: bool) -> None:
        """The rewriters either return a serialisable document or signal 'cannot rewrite'."""
        h = Hardening(round_digits=digits, top_k=k, label_only=label_only)
        for fn in (hardening_mod._v2, hardening_mod._predictions):
            try:
                new = fn(doc, h)
            except hardening_mod._Unreadable:
                continue
            assert isinstance(json.dumps(new), str)

    @FAST
    @given(protocol=st.sampled_from(PROTOCOLS), body=st.binary(max_size=200), rows=st.integers(0, 4))
    def test_arbitrary_bytes(self, protocol: str, body: bytes, rows: int) -> None:
        """Public functions on arbitrary bytes: a value or None, never an exception."""
        parsed = responses_mod.parse_response(protocol, body, rows)
        assert parsed is None or isinstance(parsed, responses_mod.ParsedResponse)
        out = harden_response(protocol, body, Hardening(round_digits=2, top_k=1))
        assert out is None or isinstance(out, bytes)

    @FAST
    @given(p=st.lists(st.lists(st.floats(0, 1), min_size=2, max_size=6), min_size=1, max_size=5),
           k=st.integers(1, 6), protocol=st.sampled_from(["v2", "v1", "mlflow"]))
    def test_top_k_round_trip(self, p: list[list[float]], k: int, protocol: str) -> None:
        """After top-k, each row has at most k non-zeros, the kept values are the row's largest, and
        the label is unchanged."""
        width = len(p[0])
        assume(all(len(row) == width for row in p))
        arr = np.array(p)
        if protocol == "v2":
            doc: Any = {"outputs": [{"name": "p", "shape": list(arr.shape), "datatype": "FP64",
                                     "data": arr.ravel().tolist()}]}
        else:
            doc = {"predictions": p}
        out = harden_response(protocol, orjson.dumps(doc), Hardening(top_k=k))
        assert out is not None
        parsed = responses_mod.parse_response(protocol, out, len(p))
        assert parsed is not None
        assert parsed.probabilities is not None
        hardened = parsed.probabilities
        assert ((hardened != 0).sum(axis=1) <= k).all()
        np.testing.assert_array_equal(hardened.max(axis=1), arr.max(axis=1))
        kept = np.sort(hardened, axis=1)[:, ::-1][:, :k]
        np.testing.assert_array_equal(kept[:, : min(k, width)], np.sort(arr, axis=1)[:, ::-1][:, :k])


# JSON text with possible duplicate keys: objects are written from lists of (key, value) pairs.
json_keys = st.sampled_from(["a", "b", "a:b", ":", "c"])
raw_json = st.recursive(
    st.sampled_from(["1", "2.5", '"x"', '"y:z"', '":"', "true", "null", "[]", "{}", "-0", "1e5"]),
    lambda inner: (st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
                   | st.lists(st.tuples(json_keys, inner), max_size=4).map(
                       lambda kvs: "{" + ",".join(f'"{k}":{v}' for k, v in kvs) + "}")),
    max_leaves=20,
)


class TestJsonFastPath:
    @settings(max_examples=EXAMPLES * 3, deadline=None)
    @given(inner=raw_json, spaces=st.booleans())
    def test_fast_path_agrees_with_exact_decoder(self, inner: str, spaces: bool) -> None:
        """orjson + colon-count check refuses exactly the bodies the duplicate-refusing stdlib hook
        refuses, and returns the same value otherwise."""
        from guard_agent.protocols._json import _loads_exact, _loads_fast

        text = '{"k": ' + inner + "}" if spaces else '{"k":' + inner + "}"
        body = text.encode()
        try:
            exact: Any = _loads_exact(body, 64)
        except ProtocolError as exc:
            exact = str(exc)
        try:
            fast: Any = _loads_fast(body, 64)
        except ProtocolError as exc:
            fast = str(exc)
        assert fast == exact
