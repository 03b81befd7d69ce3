"""``guard-agent demo``: the embedded default, end to end on one machine, in under a minute.

Starts a tiny Open Inference Protocol v2 model server (aiohttp + a scikit-learn
LogisticRegression on the bundled digits data; not MLServer), fits a detector
profile on the training split, runs the guard in front of the model with the
default policy and in-memory state, sends benign and abusive traffic over real
HTTP on loopback, and prints what was allowed, flagged, hardened, throttled,
blocked or rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web

from guard_agent.demo_text import TEXT_MODEL, TicketModel, add_text_routes, fit_text_demo_profile, text_traffic
from guard_agent.events import CallbackSink
from guard_agent.settings import Settings

__all__ = ["DigitsModel", "free_port", "make_model_app", "run_demo"]

MODEL = "digits"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DigitsModel:
    """LogisticRegression on sklearn's bundled digits (8x8 images, 10 classes, values 0..16)."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        X, y = load_digits(return_X_y=True)
        self.X_train, self.X_test, self.y_train, self.y_test = train_test_split(
            X, y, test_size=0.3, random_state=seed, stratify=y)
        self.clf = LogisticRegression(max_iter=2000).fit(self.X_train / 16.0, self.y_train)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.clf.predict_proba(X / 16.0))


def make_model_app(model: DigitsModel, name: str = MODEL) -> web.Application:
    """A minimal v2 server: health, metadata and infer (probabilities when asked, like MLServer)."""

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def metadata(_: web.Request) -> web.Response:
        return web.json_response({"name": name, "platform": "sklearn", "versions": ["1"],
                                  "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, 64]}]})

    async def infer(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        tensor = body["inputs"][0]
        X = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"][0], -1)
        proba = model.predict_proba(X)
        wanted = {o.get("name") for o in body.get("outputs", [])}
        if "predict_proba" in wanted:
            out = {"name": "predict_proba", "shape": list(proba.shape), "datatype": "FP64",
                   "data": proba.ravel().tolist()}
        else:
            labels = proba.argmax(axis=1)
            out = {"name": "predict", "shape": [len(labels), 1], "datatype": "INT64", "data": labels.tolist()}
        return web.Response(body=orjson.dumps({"model_name": name, "id": body.get("id", ""), "outputs": [out]}),
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/health/live", ready)
    app.router.add_get(f"/v2/models/{name}", metadata)
    app.router.add_post(f"/v2/models/{name}/infer", infer)
    app.router.add_post(f"/v2/repository/models/{name}/unload", ready)
    return app


def v2_body(X: np.ndarray, *, proba: bool = True) -> bytes:
    X = np.atleast_2d(X)
    doc: dict[str, Any] = {"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64",
                                       "data": X.ravel().tolist()}]}
    if proba:
        doc["outputs"] = [{"name": "predict_proba"}]
    return orjson.dumps(doc)


@contextlib.asynccontextmanager
async def _serve(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def _wait_ready(session: aiohttp.ClientSession, url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"not ready: {url}")


def _fit_profile(model: DigitsModel, directory: Path) -> str | None:
    try:
        from detectors import fit_profile, save_profile
    except ImportError:
        return None
    extra = None
    try:
        from detectors.trackers import fit_tracker_config

        extra = {"trackers": fit_tracker_config(model.X_train, model.y_train, seed=0).to_parts()}
    except ImportError:
        pass
    profile = fit_profile(model.X_train, labels=model.y_train, fpr=0.01, seed=0, extra_components=extra)
    save_profile(profile, directory, force=True)
    return str(directory)


async def run_demo(*, verbose: bool = False) -> int:
    from guard_agent.server import start_listeners

    t_start = time.monotonic()
    print("inference-guard demo: training a digits model, fitting a detector profile ...", flush=True)
    model = DigitsModel()
    tickets = TicketModel()
    rng = np.random.default_rng(7)
    events: list[dict[str, Any]] = []

    def on_event(line: bytes) -> None:
        doc = orjson.loads(line)
        events.append(doc)
        if verbose:
            print(line.decode())

    with tempfile.TemporaryDirectory(prefix="guard-demo-") as tmp:
        profile_dir = _fit_profile(model, Path(tmp) / "profiles" / MODEL)
        if profile_dir is not None:  # per-model profiles: digits, and the text scenario's tickets
            fit_text_demo_profile(tickets, Path(tmp) / "profiles" / TEXT_MODEL)
            profile_dir = str(Path(tmp) / "profiles")
        model_port, guard_port, admin_port = free_port(), free_port(), free_port()
        # every scenario's key is registered: all the demo's clients share one address, and unregistered keys
        # would share its session evidence too (docs/hardening.md, "What authenticated means")
        keys = {name: f"demo-{name}-{secrets.token_hex(8)}" for name in _CLIENTS}
        keys_file = Path(tmp) / "api-keys.json"
        keys_file.write_bytes(orjson.dumps({"keys": [{"name": n, "key": k} for n, k in keys.items()]}))
        settings = Settings(listen=f"127.0.0.1:{guard_port}", admin_listen=f"127.0.0.1:{admin_port}",
                            upstream=f"http://127.0.0.1:{model_port}", profile=profile_dir,
                            hmac_key=secrets.token_hex(16), api_keys_file=str(keys_file))
        from guard_agent.app import build_state

        state = build_state(settings, sink=CallbackSink(on_event))
        model_app = make_model_app(model)
        add_text_routes(model_app, tickets)
        async with _serve(model_app, model_port):
            guard_runner, admin_runner = await start_listeners(state)
            try:
                async with aiohttp.ClientSession() as http:
                    await _wait_ready(http, f"http://127.0.0.1:{admin_port}/readyz")
                    scenarios = await _traffic(http, f"http://127.0.0.1:{guard_port}", model, rng, tickets, keys)
            finally:
                await guard_runner.cleanup()
                await admin_runner.cleanup()
    _print_table(scenarios, events, state.policies.current.revision, state.profile.revision)
    print(f"\ndone in {time.monotonic() - t_start:.1f} s. Decision events are JSON lines on stdout when you run "
          "`guard-agent run` (see README: 'Decision events').")
    return 0


async def _send(http: aiohttp.ClientSession, url: str, body: bytes, key: str,
                path: str = f"/v2/models/{MODEL}/infer", method: str = "POST") -> int:
    headers = {"X-API-Key": key, "Content-Type": "application/json", "X-Request-Id": f"demo-{key}"}
    async with http.request(method, url + path, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


_CLIENTS = ("benign0", "benign1", "benign2", "benign3", "benign4", "invalid", "admin", "ood", "range", "blackbox",
            "extract", "flood", "tickets0", "tickets1", "tickets2", "zerowidth", "textattack")
"""Every scenario's key name (guard_agent/demo_text.py's too): each is registered before the guard starts."""


async def _traffic(http: aiohttp.ClientSession, url: str, model: DigitsModel,
                   rng: np.random.Generator, tickets: TicketModel, keys: dict[str, str]) -> dict[str, str]:
    """Each scenario under its own (registered) API key; returns key -> scenario description."""
    scenarios: dict[str, str] = {}

    def key(name: str, description: str) -> str:
        k = keys[name]
        scenarios[k] = description
        return k

    # Benign clients: held-out digits, a few each, at a human pace.
    for i in range(5):
        k = key(f"benign{i}", "benign client: held-out digits")
        for x in model.X_test[rng.choice(len(model.X_test), 20, replace=False)]:
            await _send(http, url, v2_body(x), k)
    # Invalid requests: malformed JSON, NaN, a shape that does not match its data.
    k = key("invalid", "malformed requests (bad JSON, NaN, wrong shape)")
    await _send(http, url, b'{"inputs": [', k)
    await _send(http, url, b'{"inputs":[{"name":"x","shape":[1,64],"datatype":"FP64","data":[NaN' +
                b',0' * 63 + b']}]}', k)
    await _send(http, url, b'{"inputs":[{"name":"x","shape":[1,64],"datatype":"FP64","data":[1,2,3]}]}', k)
    # Model management is not an inference route: refused, never reaches the model.
    k = key("admin", "model-management call (unload)")
    await _send(http, url, b"{}", k, path=f"/v2/repository/models/{MODEL}/unload")
    # Out-of-distribution inputs: random noise images.
    k = key("ood", "out-of-distribution inputs (noise images)")
    for _ in range(10):
        await _send(http, url, v2_body(rng.uniform(0, 16, size=64)), k)
    # Out-of-range inputs: values far outside 0..16.
    k = key("range", "inputs far outside the reference range")
    for _ in range(3):
        await _send(http, url, v2_body(rng.uniform(0, 16, size=64) * 50), k)
    # A black-box evasion attack (HopSkipJump's shape): a binary search between an image and one of another
    # class, then near-duplicate probes around the boundary point, answered with both classes. (The model's
    # own answer steers the search here: it is the answer the attacker gets back.)
    k = key("blackbox", "black-box attack (near-duplicate probing)")
    base = model.X_test[0].copy()
    label = int(model.predict_proba(base[None]).argmax())
    other = next(x for x in model.X_test if int(model.predict_proba(x[None]).argmax()) != label)
    near, far = 0.0, 1.0
    for i in range(120):
        if i < 10:
            mid = (near + far) / 2
            x = (1 - mid) * base + mid * other
            near, far = (near, mid) if int(model.predict_proba(x[None]).argmax()) != label else (mid, far)
        else:
            x = np.clip((1 - far) * base + far * other + rng.normal(0, 0.3, size=64), 0, 16)
        if await _send(http, url, v2_body(x), k) == 403:
            break
        await asyncio.sleep(0.02)  # stay under the rate limit: the session trackers should catch it
    # A model-extraction attempt: synthetic queries around known digits (augmentation, as in JBDA-style
    # attacks), to map the decision boundaries; stops once the guard refuses it three times in a row.
    k = key("extract", "model extraction (synthetic queries)")
    refused = 0
    varies = model.X_train.std(axis=0) > 0  # a careful attacker leaves the always-blank pixels blank
    for _ in range(400):
        x = np.clip(model.X_train[rng.integers(len(model.X_train))] + rng.normal(0, 3.0, size=64) * varies, 0, 16)
        refused = refused + 1 if await _send(http, url, v2_body(x), k) == 403 else 0
        if refused >= 3:
            break
        await asyncio.sleep(0.02)
    # Text: benign support tickets, invisible characters, a character-edit attack (guard_agent/demo_text.py).
    await text_traffic(http, url, tickets, key)
    # A flood from one key: the rate limit answers 429. Waves of 160 at once until one is refused: on a busy
    # machine the guard admits a wave slowly enough for the bucket to refill (50/s) behind it.
    k = key("flood", "request flood from one key")
    for _ in range(5):
        statuses = await asyncio.gather(*(_send(http, url, v2_body(model.X_test[i % 50]), k) for i in range(160)))
        if 429 in statuses:
            break
    return scenarios


def _print_table(scenarios: dict[str, str], events: list[dict[str, Any]], policy_rev: str,
                 profile_rev: str | None) -> None:
    by_session: dict[str, Counter[str]] = defaultdict(Counter)
    rules: dict[str, Counter[str]] = defaultdict(Counter)
    session_of_key: dict[str, str] = {}
    for e in events:
        rid = (e.get("http") or {}).get("request", {}).get("id", "")
        if not rid.startswith("demo-"):
            continue
        k = rid[len("demo-"):]
        if k not in scenarios:  # attack clients number their requests: demo-<key>-<n>
            k = k.rsplit("-", 1)[0]
        action = e["event"]["action"]
        by_session[k][action] += 1
        if action != "allow":
            rules[k][e["rule"]["name"]] += 1
        session_of_key[k] = e["guard"].get("session") or ""
    actions = ("allow", "flag", "harden", "throttle", "block", "reject")
    print(f"\npolicy {policy_rev[:12]} (built-in default), profile {(profile_rev or 'none')[:12]}\n")
    header = f"{'scenario':<50} " + " ".join(f"{a:>8}" for a in actions) + "  rules that fired"
    print(header)
    print("-" * len(header))
    merged: dict[str, Counter[str]] = defaultdict(Counter)
    merged_rules: dict[str, Counter[str]] = defaultdict(Counter)
    for k, description in scenarios.items():
        merged[description] += by_session.get(k, Counter())
        merged_rules[description] += rules.get(k, Counter())
    for description, counts in merged.items():
        fired = ", ".join(f"{r} x{n}" for r, n in merged_rules[description].most_common(3))
        print(f"{description:<50} " + " ".join(f"{counts.get(a, 0):>8}" for a in actions) + f"  {fired}")
