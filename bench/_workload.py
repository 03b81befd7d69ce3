"""What bench/proxy.py sends: digits rows as v2 requests, from a pool of API keys.

Request n carries API key ``n % K`` and body ``n % B``; K and B are coprime, so every session cycles
through every test row instead of repeating one (a session repeating one input would look like a
black-box attack and be blocked, which is cheap and not the traffic we want to time). The stub
upstream answers every request with one fixed v2 ``predict_proba`` body, so the trackers see a
prediction, as they would behind a real model.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

INFER_PATH = "/v2/models/digits/infer"
CHECKS_OFF_POLICY = "version: 1\nrate_limit: null\n"

# a plausible answer for one row: 10 class probabilities (sum 1) and the label
STUB_RESPONSE = json.dumps(
    {
        "model_name": "digits",
        "model_version": "1",
        "id": "bench",
        "parameters": {},
        "outputs": [
            {
                "name": "predict_proba",
                "shape": [1, 10],
                "datatype": "FP64",
                "data": [0.002, 0.004, 0.001, 0.93, 0.003, 0.02, 0.001, 0.015, 0.019, 0.005],
            }
        ],
    },
    separators=(",", ":"),
)


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference rows, their labels, and held-out rows (the request bodies)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_ref, x_test, y_ref, _ = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_ref, y_ref, x_test


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


def request_spec(x_test: np.ndarray, keys: int) -> dict[str, Any]:
    """The request pool shared by wrk and the open-loop generator."""
    n_bodies = len(x_test)
    while keys > 1 and math.gcd(keys, n_bodies) != 1:
        n_bodies -= 1
    return {
        "path": INFER_PATH,
        "keys": [f"bench-key-{i:04d}" for i in range(keys)],
        "bodies": [v2_body(r) for r in x_test[:n_bodies]],
    }


def write_spec(spec: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(spec))
    return path


def lua_script(spec: dict[str, Any], path: Path) -> Path:
    """A wrk script cycling through the same (key, body) sequence as the open-loop generator."""

    def long_string(s: str) -> str:
        assert "]==]" not in s
        return "[==[" + s + "]==]"

    lines = [
        "local bodies = {",
        *(f"  {long_string(b)}," for b in spec["bodies"]),
        "}",
        "local keys = {",
        *(f"  {long_string(k)}," for k in spec["keys"]),
        "}",
        "local n = 0",
        "request = function()",
        "  local b = bodies[(n % #bodies) + 1]",
        "  local k = keys[(n % #keys) + 1]",
        "  n = n + 1",
        f'  return wrk.format("POST", "{spec["path"]}", '
        '{["Content-Type"] = "application/json", ["X-API-Key"] = k}, b)',
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
