"""What bench/proxy.py sends: digits rows as v2 requests, from a pool of API keys.

Request n carries API key ``n % K`` and body ``n % B``; K and B are coprime, so every session cycles
through every test row instead of repeating one (a session repeating one input would look like a
black-box attack and be blocked, which is cheap and not the traffic we want to time).

The stub upstream answers like a good digits classifier: each request carries its row's true label in
an ``X-Bench-Label`` header (the guard forwards it; it scores only the body), and nginx maps it to a
fixed v2 ``predict_proba`` body predicting that class. A stub answering one class to everything would
look like a probing session to the trackers.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

INFER_PATH = "/v2/models/digits/infer"
LABEL_HEADER = "X-Bench-Label"
CHECKS_OFF_POLICY = "version: 1\nrate_limit: null\n"


def stub_answer(label: int, classes: int = 10) -> str:
    """The stub model's answer for one row of class ``label``: confident, and the probabilities sum to 1."""
    probs = [0.01] * classes
    probs[label] = round(1.0 - 0.01 * (classes - 1), 2)
    doc = {
        "model_name": "digits",
        "model_version": "1",
        "id": "bench",
        "parameters": {},
        "outputs": [{"name": "predict_proba", "shape": [1, classes], "datatype": "FP64", "data": probs}],
    }
    return json.dumps(doc, separators=(",", ":"))


def nginx_answer_map(classes: int = 10) -> str:
    """nginx ``map`` entries: label header value -> answer body (the template holds the map block)."""
    return "\n".join(f"        \"{c}\" '{stub_answer(c, classes)}';" for c in range(classes))


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reference rows and labels, held-out rows (the request bodies) and labels (what the stub answers)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_ref, x_test, y_ref, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_ref, y_ref, x_test, y_test


def v2_body(row: np.ndarray) -> str:
    """One OIP v2 request for a 64-float row, asking for probabilities as MLServer needs."""
    return json.dumps(
        {
            "inputs": [
                {"name": "input-0", "shape": [1, int(row.size)], "datatype": "FP32", "data": [float(v) for v in row]}
            ],
            "outputs": [{"name": "predict_proba"}],
        },
        separators=(",", ":"),
    )


def request_spec(x_test: np.ndarray, y_test: np.ndarray, keys: int) -> dict[str, Any]:
    """The request pool shared by wrk and the open-loop generator."""
    n_bodies = len(x_test)
    while keys > 1 and math.gcd(keys, n_bodies) != 1:
        n_bodies -= 1
    return {
        "path": INFER_PATH,
        "keys": [f"bench-api-key-{i:06d}" for i in range(keys)],  # 16+ characters: a key file takes them
        "bodies": [v2_body(r) for r in x_test[:n_bodies]],
        "headers": [{LABEL_HEADER: str(int(label))} for label in y_test[:n_bodies]],
    }


def write_spec(spec: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(spec))
    return path


def lua_script(spec: dict[str, Any], path: Path) -> Path:
    """A wrk script cycling through the same (key, body + headers) sequence as the open-loop generator."""

    def long_string(s: str) -> str:
        assert "]==]" not in s
        return "[==[" + s + "]==]"

    lines = [
        "local bodies = {",
        *(f"  {long_string(b)}," for b in spec["bodies"]),
        "}",
        "local labels = {",
        *(f"  {long_string(h[LABEL_HEADER])}," for h in spec["headers"]),
        "}",
        "local keys = {",
        *(f"  {long_string(k)}," for k in spec["keys"]),
        "}",
        "-- BENCH_OFFSET continues the sequence where the previous run against this server stopped",
        'local n = tonumber(os.getenv("BENCH_OFFSET") or "0")',
        "request = function()",
        "  local i = (n % #bodies) + 1",
        "  local b = bodies[i]",
        "  local k = keys[(n % #keys) + 1]",
        "  n = n + 1",
        f'  return wrk.format("POST", "{spec["path"]}", '
        f'{{["Content-Type"] = "application/json", ["X-API-Key"] = k, ["{LABEL_HEADER}"] = labels[i]}}, b)',
        "end",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def fit_profile(guard_agent: str, workdir: Path, x_ref: np.ndarray, y_ref: np.ndarray) -> Path:
    """``guard-agent fit`` on the reference rows (with labels, so per-class statistics exist too)."""
    np.save(workdir / "ref.npy", x_ref)
    np.save(workdir / "ref_labels.npy", y_ref)
    out = workdir / "profile"
    done = subprocess.run(
        [
            guard_agent,
            "fit",
            "--data",
            str(workdir / "ref.npy"),
            "--labels",
            str(workdir / "ref_labels.npy"),
            "--out",
            str(out),
            "--force",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"guard-agent fit failed:\n{done.stdout}\n{done.stderr}")
    return out
