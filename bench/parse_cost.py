"""Print the cost of parsing requests and reading/hardening responses (figures, not assertions).

    /work/venv/bin/python bench/parse_cost.py
"""

from __future__ import annotations

import random
import timeit
from collections.abc import Callable

import orjson

from guard_agent.protocols import Hardening, harden_response, parse_request, parse_response
from guard_agent.routes import RouteTable


def per_call_us(fn: Callable[[], object], budget_s: float = 0.5) -> float:
    """Best-of-5 mean time per call in microseconds, with the repeat count sized to the budget."""
    n = max(1, int(budget_s / max(timeit.timeit(fn, number=1), 1e-7) / 5))
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def v2_body(rows: int, width: int, nested: bool) -> bytes:
    rng = random.Random(0)
    data = [[rng.random() * 16 for _ in range(width)] for _ in range(rows)]
    return orjson.dumps({"id": "bench", "inputs": [{
        "name": "input-0", "shape": [rows, width], "datatype": "FP64",
        "data": data if nested else [x for row in data for x in row]}]})


def main() -> None:
    cases = [("v2 1x64 flat", v2_body(1, 64, False)), ("v2 1x64 nested", v2_body(1, 64, True)),
             ("v2 32x64 nested", v2_body(32, 64, True)), ("v2 4096x64 nested", v2_body(4096, 64, True))]
    escaped = v2_body(1, 64, False).replace(b'"bench"', b'"b\\u0065nch"')  # forces the exact JSON path
    cases.append(("v2 1x64 exact path", escaped))
    for label, body in cases:
        us = per_call_us(lambda b=body: parse_request("v2", b, content_type="application/json",
                                                      content_encoding=None))
        print(f"parse_request {label:<20} {len(body):>9} B  {us:10.1f} us")
    v1 = orjson.dumps({"instances": [[random.random() for _ in range(64)]]})
    us = per_call_us(lambda: parse_request("v1", v1, content_type=None, content_encoding=None))
    print(f"parse_request {'v1 1x64':<20} {len(v1):>9} B  {us:10.1f} us")

    rng = random.Random(1)
    probs = [[rng.random() for _ in range(10)] for _ in range(32)]
    flat = [p for row in probs for p in row]
    resp = orjson.dumps({"model_name": "m", "outputs": [{"name": "predict_proba", "shape": [32, 10],
                                                         "datatype": "FP64", "data": flat}]})
    print(f"parse_response v2 32x10            {per_call_us(lambda: parse_response('v2', resp, 32)):10.1f} us")
    h = Hardening(round_digits=2, top_k=3)
    print(f"harden_response v2 32x10 round+topk {per_call_us(lambda: harden_response('v2', resp, h)):10.1f} us")

    table = RouteTable()
    print(f"RouteTable.match v2 infer           "
          f"{per_call_us(lambda: table.match('POST', '/v2/models/mnist/infer')):10.2f} us")
    print(f"RouteTable.match /v2/health/ready    "
          f"{per_call_us(lambda: table.match('GET', '/v2/health/ready')):10.2f} us")


if __name__ == "__main__":
    main()
