"""Request parsers: every protocol form gives the right features, every bad body the right message."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
import pytest

from guard_agent.protocols import ParsedRequest, ParseLimits, ProtocolError, parse_request


def parse(protocol: str, doc: Any, **kw: Any) -> ParsedRequest:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    kw.setdefault("content_type", "application/json")
    kw.setdefault("content_encoding", None)
    return parse_request(protocol, body, **kw)


def v2(*inputs: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **top}


def tensor(data: Any, shape: list[int], datatype: str = "FP64", name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


class TestJsonRules:
    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b'{"inputs": [', "invalid JSON"),
            (b"", "invalid JSON"),
            (b"\xff\xfe{}", "not valid UTF-8"),
            (b'{"inputs": [], "inputs": []}', "duplicate key"),
            (b'{"inputs": [{"name": "x", "name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]}',
             "duplicate key"),
            (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1],'
             b' "parameters": {"a": {"b": 1, "\\u0062": 2}}}]}', "duplicate key"),
            (b'{"inputs": [{"name": "a:b", "shape": [1], "datatype": "FP32", "data": [1], "name": "c"}]}',
             "duplicate key"),
            (b'{"id": {"k": ":::"}, "inputs": [], "id": "x"}', "duplicate key"),
            (b'{"inputs": [], "inputs": [], "id": "\\u0061"}', "duplicate key"),
            (b"[1, 2]", "object at the top level"),
            (b'"x"', "object at the top level"),
            (b"1" * 5000, "number literal too long"),
        ],
    )
    def test_bad_json(self, body: bytes, message: str) -> None:
        """Unparseable or ambiguous JSON is refused with a message naming the problem."""
        with pytest.raises(ProtocolError, match=message):
            parse("v2", body)

    def test_depth_limit(self) -> None:
        """Nesting deeper than max_depth is refused; at the limit it is accepted."""
        deep = {"inputs": [tensor([[[[1.0]]]], [1, 1, 1, 1])]}
        assert parse("v2", deep, limits=ParseLimits(max_depth=7)).rows == 1
        with pytest.raises(ProtocolError, match="nested deeper than 6"):
            parse("v2", deep, limits=ParseLimits(max_depth=6))

    def test_extreme_nesting_is_a_protocol_error(self) -> None:
        """A body nested 100k deep is refused cleanly, not with RecursionError."""
        with pytest.raises(ProtocolError, match=r"nested|invalid JSON"):
            parse("v2", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")

    @pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "x-unknown", "gzip, identity"])
    def test_content_encoding_refused(self, encoding: str) -> None:
        """Compressed bodies are refused, never decoded or forwarded unscored."""
        with pytest.raises(ProtocolError, match="Content-Encoding"):
            parse("v2", v2(tensor([1.0], [1, 1])), content_encoding=encoding)

    @pytest.mark.parametrize("encoding", [None, "identity", "Identity ", ""])
    def test_identity_accepted(self, encoding: str | None) -> None:
        """Absent or identity Content-Encoding is fine."""
        assert parse("v2", v2(tensor([1.0], [1, 1])), content_encoding=encoding).rows == 1

    @pytest.mark.parametrize("ctype", [None, "application/json", "application/json; charset=utf-8",
                                       "Application/JSON;charset=UTF-8"])
    def test_json_content_types(self, ctype: str | None) -> None:
        """JSON protocols accept an absent or application/json Content-Type in UTF-8."""
        for protocol, doc in [("v2", v2(tensor([1.0], [1, 1]))), ("v1", {"instances": [[1.0]]}),
                              ("mlflow", {"inputs": [[1.0]]})]:
            assert parse(protocol, doc, content_type=ctype).rows == 1

    @pytest.mark.parametrize(("ctype", "message"), [("text/plain", "Content-Type"),
                                                    ("application/x-www-form-urlencoded", "Content-Type"),
                                                    ("application/json; charset=latin-1", "charset")])
    def test_other_content_types_refused(self, ctype: str, message: str) -> None:
        """Non-JSON media types and non-UTF-8 charsets are refused for every JSON protocol."""
        for protocol in ("v2", "v1", "mlflow"):
            with pytest.raises(ProtocolError, match=message):
                parse(protocol, {"inputs": [[1.0]]}, content_type=ctype)

    @pytest.mark.parametrize(("literal", "check"), [("NaN", math.isnan), ("Infinity", math.isinf),
                                                    ("-Infinity", math.isinf), ("1e400", math.isinf),
                                                    ("-1e400", math.isinf)])
    def test_non_finite_numbers_parse(self, literal: str, check: Any) -> None:
        """NaN/Infinity literals and out-of-range numbers become nan/inf for the caller's policy."""
        head = '{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP64","data":[1.0,'
        body = (head + literal + "]}]}").encode()
        assert check(parse("v2", body).features[0, 1])

    def test_huge_integer_becomes_inf(self) -> None:
        """An integer literal beyond float64 range is +inf in a float tensor (documented choice)."""
        body = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP64","data":[1,' + b"9" * 400 + b"]}]}"
        assert parse("v2", body).features[0, 1] == math.inf

    def test_unknown_protocol(self) -> None:
        """An unknown protocol name is a ProtocolError, not a crash."""
        with pytest.raises(ProtocolError, match="unknown protocol"):
            parse("grpc", {"inputs": []})

    def test_errors_never_echo_values(self) -> None:
        """Messages name the problem but never repeat client values."""
        secret = "s3cr3t-value-xyz"
        for doc in [v2(tensor([secret], [1, 1])), v2(tensor([1.0], [1, 1], datatype=secret)),
                    v2({**tensor([1.0], [1, 1]), secret: 1}), {"instances": [[1, secret]]},
                    {secret: 1, "inputs": [[1]]}]:
            for protocol in ("v2", "v1", "mlflow"):
                with pytest.raises(ProtocolError) as info:
                    parse(protocol, doc)
                assert secret not in str(info.value)


class TestV2:
    def test_flat_data(self) -> None:
        """Flat row-major data with shape [n, 64] gives n rows of 64 features."""
        data = list(range(128))
        doc = v2(tensor(data, [2, 64], "FP32", name="input-0"), outputs=[{"name": "predict_proba"}])
        r = parse("v2", doc)
        assert r.features.shape == (2, 64)
        assert r.features.dtype == np.float64
        assert r.features.flags["C_CONTIGUOUS"]
        assert r.features[1, 0] == 64
        assert (r.rows, r.row_shape, r.protocol) == (2, (64,), "v2")
        assert r.input_names == ("input-0",)
        assert r.requested_outputs == ("predict_proba",)

    def test_nested_data_keeps_row_shape(self) -> None:
        """Nested data of shape [n, 8, 8] flattens row-major and reports row_shape (8, 8)."""
        img = np.arange(2 * 64).reshape(2, 8, 8)
        r = parse("v2", v2(tensor(img.tolist(), [2, 8, 8])))
        assert r.row_shape == (8, 8)
        np.testing.assert_array_equal(r.features, img.reshape(2, 64))

    def test_nested_data_in_another_layout(self) -> None:
        """Nesting need not mirror shape: only the row-major element count must match."""
        r = parse("v2", v2(tensor([[1, 2, 3], [4, 5, 6]], [3, 2])))
        np.testing.assert_array_equal(r.features, [[1, 2], [3, 4], [5, 6]])

    def test_several_inputs_concatenate_per_row(self) -> None:
        """Several inputs are flattened per row and concatenated in input order."""
        r = parse("v2", v2(tensor([1, 2, 3, 4], [2, 2], "INT32", "a"),
                           tensor([True, False], [2], "BOOL", "b"),
                           tensor([[0.5], [1.5]], [2, 1], "FP16", "c")))
        np.testing.assert_array_equal(r.features, [[1, 2, 1, 0.5], [3, 4, 0, 1.5]])
        assert r.row_shape == (4,)
        assert r.input_names == ("a", "b", "c")
        assert r.input_datatypes == ("INT32", "BOOL", "FP16")

    def test_one_dimensional_shape_is_a_batch_of_scalars(self) -> None:
        """shape [n] means n rows with one feature each."""
        r = parse("v2", v2(tensor([1.0, 2.0, 3.0], [3])))
        assert r.features.shape == (3, 1)
        assert r.row_shape == (1,)

    @pytest.mark.parametrize("datatype", ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
                                          "UINT64", "FP16", "FP32", "FP64"])
    def test_all_numeric_datatypes(self, datatype: str) -> None:
        """Every numeric OIP datatype parses integer data."""
        assert parse("v2", v2(tensor([1, 2], [1, 2], datatype))).features.tolist() == [[1.0, 2.0]]

    @pytest.mark.parametrize(
        ("doc", "message"),
        [
            ({"id": "x"}, "missing inputs"),
            (v2(), "non-empty list"),
            ({"inputs": {"x": 1}}, "non-empty list"),
            (v2(tensor([1, 2, 3], [2, 2])), "3 elements but shape needs 4"),
            (v2(tensor([1, 2, 3, 4, 5], [2, 2])), "5 elements but shape needs 4"),
            (v2(tensor(["a", "b"], [1, 2])), "a string"),
            (v2(tensor([1, None], [1, 2])), "null"),
            (v2(tensor([1, {"a": 1}], [1, 2])), "an object"),
            (v2(tensor([1, True], [1, 2])), "booleans where numbers are expected"),
            (v2(tensor([True, True], [1, 2], "INT32")), "booleans where numbers are expected"),
            (v2(tensor([1, 0], [1, 2], "BOOL")), "BOOL data must be true/false"),
            (v2(tensor([1.5, 2], [1, 2], "INT32")), "non-integer value"),
            (v2(tensor([300, 2], [1, 2], "UINT8")), "out of range for UINT8"),
            (v2(tensor([-1, 2], [1, 2], "UINT32")), "out of range for UINT32"),
            (v2(tensor([2**63, 2], [1, 2], "INT64")), "out of range for INT64"),
            (v2(tensor([[1, 2], [3]], [1, 3])), "ragged"),
            (v2(tensor([[1, 2], 3], [1, 3])), "ragged"),
            (v2(tensor(["a"], [1, 1], "BYTES"), tensor([1], [1, 1])), "numeric inputs cannot be mixed"),
            (v2(tensor([1], [1, 1], "FLOAT32")), "unsupported datatype"),
            (v2(tensor([1], [1, 1], 5)), "datatype must be a string"),
            (v2(tensor([], [0, 4])), "empty batch"),
            (v2(tensor([], [2, 0])), "no features"),
            (v2(tensor([1], [])), "shape must be a non-empty list"),
            (v2(tensor([1], [1, -1])), "non-negative integers"),
            (v2(tensor([1], [1, True])), "non-negative integers"),
            (v2(tensor([1], [1, 1.0])), "non-negative integers"),
            (v2(tensor([1], [1] * 40)), "more than 32 dimensions"),
            (v2(tensor([], [0, 2**62])), "shape is too large"),
            (v2(tensor([], [1, 0, 2**62, 2**62])), "shape is too large"),
            (v2(tensor([], [5000, 0])), "too many rows: 5000 > 4096"),
            (v2({"name": "x", "shape": [1, 1], "datatype": "FP32"}), "missing data"),
            (v2({"shape": [1, 1], "datatype": "FP32", "data": [1]}), "name must be a string"),
            (v2(tensor([1], [1, 1]), tensor([1], [1, 1])), "duplicate input name"),
            (v2(tensor([1, 2], [2, 1], name="a"), tensor([1], [1, 1], name="b")), "different batch sizes"),
            (v2({**tensor([1], [1, 1]), "content": 1}), "inputs\\[0\\]: unknown field"),
            ({"inputs": [tensor([1], [1, 1])], "extra": 1}, "request: unknown field"),
            (v2("x"), "inputs\\[0\\] must be an object"),
            (v2(tensor([1], [1, 1]), outputs=[{"name": "p", "parameters": {"binary_data": True}}]),
             "binary output"),
            (v2(tensor([1], [1, 1]), parameters={"binary_data_output": True}), "binary output"),
            (v2(tensor([1], [1, 1]), outputs=[{"name": "p", "parameters": {"classification": 3}}]),
             "classification extension"),
            (v2(tensor([1], [1, 1]), outputs=[{"nom": "p"}]), "outputs\\[0\\].name"),
            (v2(tensor([1], [1, 1]), id=5), "id must be a string"),
            (v2({**tensor(None, [1, 4]), "data": None, "parameters": {"binary_data_size": 16}}),
             "without Inference-Header-Content-Length"),
        ],
    )
    def test_errors(self, doc: Any, message: str) -> None:
        """Each malformed v2 request is refused with a message that names the problem."""
        with pytest.raises(ProtocolError, match=message):
            parse("v2", doc)

    def test_row_and_feature_limits(self) -> None:
        """Batches above max_rows and rows above max_features are refused."""
        doc = v2(tensor(list(range(20)), [10, 2]))
        with pytest.raises(ProtocolError, match="too many rows: 10 > 5"):
            parse("v2", doc, limits=ParseLimits(max_rows=5))
        with pytest.raises(ProtocolError, match="too many features per row: 2 > 1"):
            parse("v2", doc, limits=ParseLimits(max_features=1))


def binary_body(header: dict[str, Any], *arrays: np.ndarray) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + b"".join(a.tobytes() for a in arrays), len(head)


class TestV2Binary:
    def test_binary_tensors(self) -> None:
        """The binary extension is parsed: JSON header, then raw little-endian tensors in input order."""
        a = np.arange(6, dtype="<f4").reshape(2, 3)
        b = np.array([[7], [8]], dtype="<i8")
        header = {"inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
            {"name": "b", "shape": [2, 1], "datatype": "INT64", "parameters": {"binary_data_size": b.nbytes}},
        ]}
        body, n = binary_body(header, a, b)
        r = parse_request("v2", body, content_type="application/octet-stream", content_encoding=None,
                          inference_header_length=n)
        np.testing.assert_array_equal(r.features, [[0, 1, 2, 7], [3, 4, 5, 8]])

    def test_binary_mixed_with_json_data(self) -> None:
        """A JSON-data input and a binary input can be mixed in one request."""
        a = np.array([1.5, 2.5], dtype="<f8")
        header = v2(tensor([1, 2], [2, 1], "INT32", "j"),
                    {"name": "b", "shape": [2, 1], "datatype": "FP64",
                     "parameters": {"binary_data_size": a.nbytes}})
        body, n = binary_body(header, a)
        r = parse_request("v2", body, content_type=None, content_encoding=None, inference_header_length=n)
        np.testing.assert_array_equal(r.features, [[1, 1.5], [2, 2.5]])

    @pytest.mark.parametrize(
        ("size", "extra", "length_delta", "message"),
        [
            (12, b"", 0, "does not match shape"),
            (16, b"\x00" * 4, 0, "longer than the inputs declare"),
            (16, b"", 10_000, "does not fit the body"),
        ],
    )
    def test_binary_errors(self, size: int, extra: bytes, length_delta: int, message: str) -> None:
        """Sizes that disagree with shape or body length are refused."""
        a = np.zeros(4, dtype="<f4")
        header = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32",
                              "parameters": {"binary_data_size": size}}]}
        body, n = binary_body(header, a)
        with pytest.raises(ProtocolError, match=message):
            parse_request("v2", body + extra, content_type=None, content_encoding=None,
                          inference_header_length=n + length_delta)

    def test_binary_shorter_than_declared(self) -> None:
        """A body that ends before the declared binary size is refused."""
        header = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32",
                              "parameters": {"binary_data_size": 16}}]}
        body, n = binary_body(header, np.zeros(2, dtype="<f4"))
        with pytest.raises(ProtocolError, match="shorter than binary_data_size"):
            parse_request("v2", body, content_type=None, content_encoding=None, inference_header_length=n)

    def test_binary_bool_must_be_zero_or_one(self) -> None:
        """BOOL binary bytes other than 0/1 are refused (they would read differently elsewhere)."""
        header = {"inputs": [{"name": "a", "shape": [1, 2], "datatype": "BOOL",
                              "parameters": {"binary_data_size": 2}}]}
        body, n = binary_body(header)
        with pytest.raises(ProtocolError, match="BOOL binary"):
            parse_request("v2", body + b"\x01\x07", content_type=None, content_encoding=None,
                          inference_header_length=n)

    @pytest.mark.parametrize(("length", "ctype", "message"),
                             [(-1, None, "does not fit"), (0, "text/plain", "Content-Type"),
                              (0, None, "invalid JSON")])
    def test_bad_header_values(self, length: int, ctype: str | None, message: str) -> None:
        """A malformed header length (the caller passes -1), a non-binary media type or an empty JSON
        part are refused."""
        with pytest.raises(ProtocolError, match=message):
            parse_request("v2", b"{}", content_type=ctype, content_encoding=None, inference_header_length=length)

    def test_binary_header_on_other_protocols(self) -> None:
        """The binary extension is refused on non-v2 routes."""
        with pytest.raises(ProtocolError, match="v2 only"):
            parse_request("v1", b"{}", content_type=None, content_encoding=None, inference_header_length=2)


class TestV1:
    @pytest.mark.parametrize(
        ("doc", "features", "row_shape", "names"),
        [
            ({"instances": [[1, 2], [3, 4]]}, [[1, 2], [3, 4]], (2,), ()),
            ({"instances": [[[1, 2], [3, 4]]]}, [[1, 2, 3, 4]], (2, 2), ()),
            ({"instances": [1.5, 2.5]}, [[1.5], [2.5]], (1,), ()),
            ({"instances": [{"a": 1, "b": [2, 3]}, {"b": [5, 6], "a": 4}]}, [[1, 2, 3], [4, 5, 6]], (3,),
             ("a", "b")),
            ({"instances": [[1, 2]], "signature_name": "serving_default"}, [[1, 2]], (2,), ()),
            ({"inputs": [[1, 2], [3, 4]]}, [[1, 2], [3, 4]], (2,), ()),
            ({"inputs": {"a": [1, 2], "b": [[3, 4], [5, 6]]}}, [[1, 3, 4], [2, 5, 6]], (3,), ("a", "b")),
        ],
    )
    def test_forms(self, doc: Any, features: list[list[float]], row_shape: tuple[int, ...],
                   names: tuple[str, ...]) -> None:
        """Row and columnar forms, plain and named, give the expected feature rows."""
        r = parse("v1", doc)
        np.testing.assert_array_equal(r.features, features)
        assert (r.row_shape, r.input_names, r.protocol) == (row_shape, names, "v1")

    @pytest.mark.parametrize(
        ("doc", "message"),
        [
            ({}, "exactly one of instances or inputs"),
            ({"instances": [[1]], "inputs": [[1]]}, "exactly one of instances or inputs"),
            ({"instances": [[1]], "parameters": {}}, "unknown top-level field"),
            ({"instances": []}, "empty batch"),
            ({"instances": {"a": 1}}, "instances must be a list"),
            ({"instances": [[1, 2], [3]]}, "ragged"),
            ({"instances": [[1, "2"]]}, "a string"),
            ({"instances": [[1, None]]}, "null"),
            ({"instances": [[True, 1]]}, "booleans"),
            ({"instances": [{"a": 1}, {"b": 1}]}, "different fields"),
            ({"instances": [{"a": 1}, [1]]}, "objects mixed"),
            ({"instances": [{}]}, "no fields"),
            ({"instances": [{"img": {"b64": "aGVsbG8="}}]}, "an object"),
            ({"instances": [{"a": [1, 2]}, {"a": [1]}]}, "ragged"),
            ({"inputs": {"a": [1, 2], "b": [1]}}, "different batch sizes"),
            ({"inputs": {"a": 1}}, "no batch dimension"),
            ({"inputs": {}}, "no tensors"),
            ({"inputs": "x"}, "list or an object"),
            ({"inputs": []}, "empty batch"),
            ({"instances": [[1]], "signature_name": 3}, "signature_name must be a string"),
        ],
    )
    def test_errors(self, doc: Any, message: str) -> None:
        """Each malformed v1 request is refused with a message that names the problem."""
        with pytest.raises(ProtocolError, match=message):
            parse("v1", doc)

    def test_too_many_rows(self) -> None:
        """v1 batches above max_rows are refused before conversion."""
        with pytest.raises(ProtocolError, match="too many rows"):
            parse("v1", {"instances": [[1]] * 10}, limits=ParseLimits(max_rows=9))


class TestMlflow:
    @pytest.mark.parametrize(
        ("doc", "features", "names"),
        [
            ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}, [[1, 2], [3, 4]],
             ("a", "b")),
            ({"dataframe_split": {"data": [[1, 2]], "index": [7]}}, [[1, 2]], ()),
            ({"dataframe_records": [{"a": 1, "b": 2}, {"b": 4, "a": 3}]}, [[1, 2], [3, 4]], ("a", "b")),
            ({"instances": [[1, 2], [3, 4]], "params": {"k": 1}}, [[1, 2], [3, 4]], ()),
            ({"inputs": {"a": [1, 3], "b": [2, 4]}}, [[1, 2], [3, 4]], ("a", "b")),
            ({"inputs": [[1, 2], [3, 4]]}, [[1, 2], [3, 4]], ()),
        ],
    )
    def test_json_forms(self, doc: Any, features: list[list[float]], names: tuple[str, ...]) -> None:
        """Every MLflow JSON input form gives the expected feature rows and column names."""
        r = parse("mlflow", doc)
        np.testing.assert_array_equal(r.features, features)
        assert (r.input_names, r.protocol) == (names, "mlflow")

    @pytest.mark.parametrize(
        ("doc", "message"),
        [
            ({}, "exactly one of"),
            ({"instances": [[1]], "inputs": [[1]]}, "exactly one of"),
            ({"instances": [[1]], "extra": 1}, "unknown top-level field"),
            ({"instances": [[1]], "params": []}, "params must be an object"),
            ({"dataframe_split": [[1]]}, "dataframe_split must be an object"),
            ({"dataframe_split": {"columns": ["a"]}}, "missing data"),
            ({"dataframe_split": {"data": [[1]], "dtypes": {}}}, "unknown field"),
            ({"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}, "1 columns but rows have 2 cells"),
            ({"dataframe_split": {"columns": ["a", "a"], "data": [[1, 2]]}}, "duplicate column"),
            ({"dataframe_split": {"columns": [1], "data": [[1]]}}, "list of strings"),
            ({"dataframe_split": {"data": [[1], [2]], "index": [0]}}, "one entry per row"),
            ({"dataframe_split": {"data": [1, 2]}}, "list of rows of numbers"),
            ({"dataframe_split": {"data": [[1, "x"]]}}, "a string"),
            ({"dataframe_split": {"data": []}}, "empty batch"),
            ({"dataframe_records": [{"a": 1}, {"a": 1, "b": 2}]}, "different fields"),
            ({"dataframe_records": [{"a": "x", "b": 1}]}, "a string"),
            ({"dataframe_records": [{"a": [1, 2]}]}, "cells must be numbers"),
            ({"dataframe_records": [1]}, "list of objects"),
            ({"dataframe_records": []}, "empty batch"),
        ],
    )
    def test_errors(self, doc: Any, message: str) -> None:
        """Each malformed MLflow request is refused with a message that names the problem."""
        with pytest.raises(ProtocolError, match=message):
            parse("mlflow", doc)

    def test_csv(self) -> None:
        """A text/csv body with a header row parses to numeric rows, header as names."""
        r = parse("mlflow", b"a,b,c\n1,2.5,-3e2\n4,nan,inf\n", content_type="text/csv")
        assert r.input_names == ("a", "b", "c")
        assert r.features[0].tolist() == [1.0, 2.5, -300.0]
        assert math.isnan(r.features[1, 1])
        assert math.isinf(r.features[1, 2])

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b"a,b\n1,x\n", "non-numeric"),
            (b"a,b\n1,2,3\n", "has 3 cells, header has 2"),
            (b"a,b\n", "empty batch"),
            (b"", "no header"),
            (b"a,b\n1,1_000\n", "non-numeric"),
            (b"a\n\xff\n", "UTF-8"),
            (b"a\n1\x00\n", "NUL"),
            (b'a,b\n1,2\n"1,5",2\n', r"row 2, column 1: a quoted cell holds a comma"),
            (b'a,b,c\n1,"2,5",3\n', r"row 1, column 2: a quoted cell holds a comma"),
            (b'a,b\n"1,5"\n', "has 1 cells, header has 2"),
        ],
    )
    def test_csv_errors(self, body: bytes, message: str) -> None:
        """Malformed CSV bodies are refused with a precise message."""
        with pytest.raises(ProtocolError, match=message):
            parse("mlflow", body, content_type="text/csv")

    def test_csv_quoting(self) -> None:
        """CSV is read with RFC 4180 quoting: quoted numbers are numbers, a quoted header may hold a comma."""
        r = parse("mlflow", b'"a,x",b\n"1.5",2\n', content_type="text/csv")
        assert r.input_names == ("a,x", "b")
        assert r.features.tolist() == [[1.5, 2.0]]


class TestCustomPointer:
    @pytest.mark.parametrize(
        ("doc", "pointer", "features"),
        [
            ({"data": {"x": [[1, 2], [3, 4]]}}, "/data/x", [[1, 2], [3, 4]]),
            ({"data": {"x": [1, 2, 3]}}, "/data/x", [[1, 2, 3]]),
            ({"a/b": {"m~n": [1]}}, "/a~1b/m~0n", [[1]]),
            ({"rows": [{"v": [5, 6]}]}, "/rows/0/v", [[5, 6]]),
            ({"": [7]}, "/", [[7]]),
        ],
    )
    def test_pointer_forms(self, doc: Any, pointer: str, features: list[list[float]]) -> None:
        """RFC 6901 pointers (escapes, array indices, empty key) find the batch or single row."""
        r = parse("custom", doc, pointer=pointer)
        np.testing.assert_array_equal(r.features, features)
        assert r.protocol == "custom"

    def test_deeper_arrays_keep_row_shape(self) -> None:
        """A 3-D array is a batch of 2-D instances."""
        r = parse("custom", {"x": [[[1, 2], [3, 4]]]}, pointer="/x")
        assert r.row_shape == (2, 2)
        assert r.features.shape == (1, 4)

    @pytest.mark.parametrize(
        ("doc", "pointer", "message"),
        [
            ({"x": [1]}, "/y", "member #1 not found"),
            ({"x": [1]}, "/x/1", "out of range"),
            ({"x": [[1]]}, "/x/01", "not an array index"),
            ({"x": [[1]]}, "/x/-", "not an array index"),
            ({"x": 1}, "/x/y", "goes through a scalar"),
            ({"x": 1}, "/x", "found a single number"),
            ({"x": [1]}, "/x~2", "bad pointer"),
            ({"x": [1]}, "x", "bad pointer"),
            ({"x": [1]}, None, "bad pointer"),
            ({"x": [1, "a"]}, "/x", "a string"),
            ({"x": []}, "/x", "no features"),
            ({"x": {"a": 1}}, "/x", "an object"),
        ],
    )
    def test_errors(self, doc: Any, pointer: str | None, message: str) -> None:
        """Bad pointers and non-numeric targets are refused with a precise message."""
        with pytest.raises(ProtocolError, match=message):
            parse("custom", doc, pointer=pointer)


class TestExceptionNet:
    def test_unexpected_errors_become_protocol_errors(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """If a parser ever raised something else, the public entry point still answers ProtocolError."""
        from guard_agent.protocols import _dispatch

        def broken(*_: Any, **__: Any) -> ParsedRequest:
            raise TypeError("bug")

        monkeypatch.setattr(_dispatch, "parse_v1", broken)
        with pytest.raises(ProtocolError, match="malformed request"):
            parse("v1", {"instances": [[1]]})
