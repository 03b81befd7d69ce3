"""Text requests: every protocol form gives one text per row; bad text gets a clear 400 message."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest

from guard_agent.protocols import ParsedRequest, ParseLimits, ProtocolError, parse_request


def parse(protocol: str, doc: Any, **kw: Any) -> ParsedRequest:
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    kw.setdefault("content_type", "application/json")
    kw.setdefault("content_encoding", None)
    return parse_request(protocol, body, **kw)


def binary_v2(values: list[bytes]) -> tuple[bytes, int]:
    raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
    header = orjson.dumps({"inputs": [{"name": "text", "shape": [len(values)], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(raw), "content_type": "str"}}]})
    return header + raw, len(header)


class TestTextForms:
    @pytest.mark.parametrize(
        ("protocol", "doc", "texts"),
        [
            ("v2", {"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["free money", "hi mum"],
                                "parameters": {"content_type": "str"}}]}, ("free money", "hi mum")),
            ("v2", {"inputs": [{"name": "t", "shape": [2, 1], "datatype": "BYTES", "data": [["a b"], ["c"]]}]},
             ("a b", "c")),
            ("v2", {"inputs": [{"name": "q", "shape": [1], "datatype": "BYTES", "data": ["title"]},
                               {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["body"]}]},
             ("title\nbody",)),
            ("v1", {"instances": ["great film", "dull"]}, ("great film", "dull")),
            ("v1", {"instances": [{"title": "t", "body": "b"}]}, ("t\nb",)),
            ("v1", {"inputs": {"text": ["x", "y"]}}, ("x", "y")),
            ("mlflow", {"dataframe_split": {"columns": ["text"], "data": [["hello"], ["bye"]]}}, ("hello", "bye")),
            ("mlflow", {"dataframe_records": [{"text": "hello"}]}, ("hello",)),
            ("mlflow", {"instances": ["é ü"]}, ("é ü",)),
        ],
    )
    def test_forms(self, protocol: str, doc: Any, texts: tuple[str, ...]) -> None:
        """Each documented text form parses to one text per row, with projected features per row."""
        parsed = parse(protocol, doc)
        assert parsed.texts == texts
        assert parsed.rows == len(texts)
        assert parsed.features.shape == (len(texts), 35)

    def test_custom_pointer(self) -> None:
        """A custom route's pointer may name one string (one row) or a list of strings."""
        assert parse("custom", {"q": {"prompt": "hi"}}, pointer="/q/prompt").texts == ("hi",)
        assert parse("custom", {"q": ["a", "b"]}, pointer="/q").texts == ("a", "b")

    def test_binary_extension(self) -> None:
        """The v2 binary extension's BYTES elements (4-byte length + UTF-8) are read exactly."""
        body, header = binary_v2(["naïve".encode(), b"ok"])
        parsed = parse("v2", body, inference_header_length=header, content_type="application/octet-stream")
        assert parsed.texts == ("naïve", "ok")

    def test_numeric_unchanged(self) -> None:
        """Numeric bodies still parse as numbers, without texts."""
        parsed = parse("v1", {"instances": [[1.0, 2.0]]})
        assert parsed.texts == ()
        assert parsed.features.tolist() == [[1.0, 2.0]]


class TestTextRefusals:
    @pytest.mark.parametrize(
        ("protocol", "doc", "message"),
        [
            ("v2", {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                               {"name": "n", "shape": [1], "datatype": "FP32", "data": [1]}]},
             "numeric inputs cannot be mixed"),
            ("v2", {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [1]}]}, "numbers mixed"),
            ("v2", {"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a"]}]},
             "1 elements but shape needs 2"),
            ("v2", {"inputs": [{"name": "t", "shape": [1, 0], "datatype": "BYTES", "data": []}]}, "no elements"),
            ("v2", {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"],
                                "parameters": {"content_type": "base64"}}]}, "content_type"),
            ("v1", {"instances": ["a", 1]}, "numbers mixed"),
            ("v1", {"instances": [{"b64": "aGk="}]}, "b64 binary values are not text"),
            ("v1", {"instances": [{"a": "x"}, {"b": "y"}]}, "different fields"),
            ("mlflow", {"dataframe_records": [{"a": "x", "b": 2}]}, "a string"),
        ],
    )
    def test_refused(self, protocol: str, doc: Any, message: str) -> None:
        """Mixed, malformed or non-text values are refused with a message naming the problem."""
        with pytest.raises(ProtocolError, match=message):
            parse(protocol, doc)

    def test_lone_surrogate(self) -> None:
        """A JSON escape of a lone surrogate is not valid Unicode text: refused, not forwarded."""
        with pytest.raises(ProtocolError, match="not valid Unicode"):
            parse("v1", b'{"instances": ["ab\\ud800"]}')

    def test_binary_not_utf8(self) -> None:
        """Binary BYTES elements must be UTF-8: anything else is refused with a clear message."""
        body, header = binary_v2([b"\xff\xfeh\x00i\x00"])
        with pytest.raises(ProtocolError, match="not UTF-8"):
            parse("v2", body, inference_header_length=header)

    def test_binary_lengths_checked(self) -> None:
        """A BYTES element length running past binary_data_size is refused."""
        body, header = binary_v2([b"hello"])
        broken = body[:header] + struct.pack("<I", 99) + body[header + 4:]
        with pytest.raises(ProtocolError, match="longer than binary_data_size"):
            parse("v2", broken, inference_header_length=header)

    def test_limits(self) -> None:
        """Characters per text and texts per request are bounded by ParseLimits."""
        limits = ParseLimits(max_texts=3, max_text_chars=10)
        assert parse("v1", {"instances": ["x" * 10] * 3}, limits=limits).rows == 3
        with pytest.raises(ProtocolError, match="longer than 10 characters"):
            parse("v1", {"instances": ["x" * 11]}, limits=limits)
        with pytest.raises(ProtocolError, match="too many text inputs"):
            parse("v1", {"instances": ["x"] * 4}, limits=limits)
        with pytest.raises(ProtocolError, match="too many text inputs"):
            parse("v1", {"instances": [["a", "b"], ["c", "d"]]}, limits=limits)

    def test_errors_never_echo_values(self) -> None:
        """Refusal messages never repeat the client's text."""
        secret = "s3cr3t-text-xyz"
        for doc in ({"instances": [secret, 1]}, {"instances": [{"b64": secret}]}):
            with pytest.raises(ProtocolError) as info:
                parse("v1", doc)
            assert secret not in str(info.value)
