"""Shared fixtures: a real MLServer serving a digits model, the demo model server, and a real guard on loopback
ports."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from guard_agent.demo import DigitsModel, make_model_app
from guard_agent.events import CallbackSink
from guard_agent.settings import Settings
from tests._support.servers import free_port as free_port  # re-exported: tests import it from here
from tests._support.servers import serve_app


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


@dataclass
class DigitsData:
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def digits() -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    return DigitsData(X_train, X_test, y_train, y_test)


def write_mlserver_repo(root: Path, X: np.ndarray, y: np.ndarray, port: int, *, name: str = "digits") -> None:
    """A model repository MLServer can serve: a LogisticRegression saved the way mlserver-sklearn loads it."""
    import joblib  # MLServer's own model format; only the test writes it, the guard never loads it
    from sklearn.linear_model import LogisticRegression

    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    clf = LogisticRegression(max_iter=3000).fit(X, y)
    joblib.dump(clf, model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": name, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"}}))
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": 0, "debug": False}))


def start_mlserver(root: Path, port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("mlserver") or str(Path(sys.executable).parent / "mlserver")
    log = open(root / "mlserver.log", "wb")  # noqa: SIM115 - owned by the process for its lifetime
    proc = subprocess.Popen([exe, "start", str(root)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLSERVER_LOGGING": "WARNING"})
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/models/digits/ready", timeout=90, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError((root / "mlserver.log").read_text()[-3000:]) from None
    return proc


@dataclass
class ModelServer:
    url: str
    port: int
    root: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def mlserver(tmp_path_factory: pytest.TempPathFactory, digits: DigitsData) -> Iterator[ModelServer]:
    """A real MLServer 1.7.1 with mlserver-sklearn, serving LogisticRegression on digits, on a free port."""
    root = tmp_path_factory.mktemp("mlserver")
    port = free_port()
    write_mlserver_repo(root, digits.X_train, digits.y_train, port)
    proc = start_mlserver(root, port)
    yield ModelServer(f"http://127.0.0.1:{port}", port, root, proc)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def demo_model() -> DigitsModel:
    """The demo's digits model, fitted once (it is deterministic and never changed by a test)."""
    return DigitsModel()


@pytest.fixture
async def demo_model_url(demo_model: DigitsModel) -> AsyncIterator[str]:
    """The built-in digits v2 model server (``guard_agent.demo``) on a free loopback port."""
    async with serve_app(make_model_app(demo_model)) as url:
        yield url


def v2_body(X: np.ndarray, *, proba: bool = True, datatype: str = "FP64") -> bytes:
    X = np.atleast_2d(X)
    doc: dict[str, Any] = {"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": datatype,
                                       "data": X.ravel().tolist()}]}
    if proba:
        doc["outputs"] = [{"name": "predict_proba"}]
    return orjson.dumps(doc)


@dataclass
class RunningGuard:
    url: str
    admin_url: str
    state: Any
    events: list[dict[str, Any]] = field(default_factory=list)

    def events_for(self, request_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if (e.get("http") or {}).get("request", {}).get("id") == request_id]


GuardFactory = Callable[..., Any]


@pytest.fixture
async def start_guard() -> AsyncIterator[GuardFactory]:
    """Start the real guard (both listeners) in this event loop; stopped after the test."""
    from guard_agent.app import build_state
    from guard_agent.server import start_listeners

    runners: list[Any] = []

    async def _start(upstream: str, *, policy: str | None = None, profile: str | None = None,
                     wait_ready: bool = True, **overrides: Any) -> RunningGuard:
        for attempt in range(3):
            settings = Settings(listen=f"127.0.0.1:{free_port()}", admin_listen=f"127.0.0.1:{free_port()}",
                                upstream=upstream, policy=policy, profile=profile, hmac_key="test-hmac-key",
                                admin_token="test-admin-token", reload_interval=0.1)
            settings = replace(settings, **overrides)
            events: list[dict[str, Any]] = []
            state = build_state(settings, sink=CallbackSink(lambda line, ev=events: ev.append(orjson.loads(line))))
            try:
                guard_runner, admin_runner = await start_listeners(state)
                break
            except OSError as exc:
                # a port free_port() found was taken by another process before the guard bound it: pick again
                if exc.errno != errno.EADDRINUSE or attempt == 2 or {"listen", "admin_listen"} & set(overrides):
                    raise
        runners.extend([guard_runner, admin_runner])
        guard = RunningGuard(f"http://{settings.listen}", f"http://{settings.admin_listen}", state, events)
        if wait_ready:
            import asyncio

            for _ in range(100):
                if state.upstream_ok:
                    break
                await asyncio.sleep(0.05)
        return guard

    yield _start
    for runner in reversed(runners):
        await runner.cleanup()
