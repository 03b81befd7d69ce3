"""A real guard for the operator tests, running in a background thread so that synchronous clients (the
attack code, the CLI, Prometheus scraping over loopback) can talk to it.

One event loop in one thread hosts the demo's built-in v2 model server (scikit-learn digits), an HTTP
SIEM receiver that acknowledges every batch, and the guard (both listeners) with a fitted profile, the
session trackers, capture on, an admin token, an HTTP sink and, when given, a Redis of the test's own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from guard_agent.demo import DigitsModel, make_model_app
from guard_agent.events import CallbackSink
from guard_agent.policy.store import default_policy_text
from guard_agent.settings import Settings
from guard_agent.state import GuardState
from tests._support.servers import free_port, serve_app

ADMIN_TOKEN = "ops-test-admin-token"


@dataclass
class RunningGuard:
    url: str
    admin: str
    state: GuardState
    capture_dir: Path
    token_file: Path
    policy: Path
    model: DigitsModel
    events: list[bytes] = field(default_factory=list)
    sink_batches: list[bytes] = field(default_factory=list)


def fit_demo_profile(model: DigitsModel, directory: Path) -> str:
    """The demo's profile (detectors and session trackers fitted on the model's training data)."""
    from guard_agent.demo import _fit_profile

    path = _fit_profile(model, directory)
    assert path is not None, "the detectors are part of the package: the profile must fit"
    return path


def record_canaries(root: Path, model: DigitsModel, model_url: str) -> str:
    """``guard-agent canary record`` against the model server, as an operator records them."""
    import numpy as np

    from guard_agent.cli import main

    data = root / "reference.npy"
    np.save(data, model.X_train)
    out = root / "canaries"
    code = main(["canary", "record", "--upstream", model_url, "--model", "digits", "--data", str(data),
                 "--out", str(out), "--count", "16", "--pool", "256"])
    assert code == 0, "canary record failed"
    return str(out)


@contextmanager
def running_guard(root: Path, model: DigitsModel, profile: str, *, redis_url: str | None = None,
                  admin_port: int | None = None, api_keys: tuple[str, ...] = (),
                  **overrides: Any) -> Iterator[RunningGuard]:
    """The guard in front of the demo model server, until the ``with`` block ends; canaries recorded
    from the model (``guard-agent canary record``) and checked every 2 seconds."""
    from guard_agent.app import build_state
    from guard_agent.server import start_listeners

    loop = asyncio.new_event_loop()
    ready: Future[RunningGuard] = Future()
    stop = asyncio.Event()

    async def main() -> None:
        received: list[bytes] = []

        async def collect(request: web.Request) -> web.Response:
            received.append(await request.read())
            return web.Response(status=200)

        sink_app = web.Application()
        sink_app.router.add_post("/in", collect)
        try:
            async with serve_app(make_model_app(model)) as model_url, serve_app(sink_app) as sink_url:
                canaries = await asyncio.get_running_loop().run_in_executor(
                    None, record_canaries, root, model, model_url)
                policy = root / "policy.yaml"
                policy.write_text(default_policy_text())
                token_file = root / "admin-token"
                token_file.write_text(ADMIN_TOKEN + "\n")
                keys_file = root / "api-keys.yaml"
                keys_file.write_text(yaml.safe_dump({"keys": [{"name": f"client-{i}", "key": key}
                                                              for i, key in enumerate(api_keys)]}))
                admin = admin_port or free_port()
                settings = Settings(listen=f"127.0.0.1:{free_port()}", admin_listen=f"127.0.0.1:{admin}",
                                    upstream=model_url, policy=str(policy), profile=profile,
                                    hmac_key="ops-test-hmac-key", admin_token=ADMIN_TOKEN,
                                    capture_dir=str(root / "capture"), redis_url=redis_url,
                                    sinks=({"type": "http", "name": "siem", "url": f"{sink_url}/in",
                                            "retry_initial": 0.05, "retry_max": 0.3},),
                                    spool_dir=str(root / "spool"), canaries=canaries, canary_interval=2.0,
                                    api_keys_file=str(keys_file) if api_keys else None,
                                    **overrides)
                events: list[bytes] = []
                state = build_state(settings, sink=CallbackSink(events.append))
                runners = await start_listeners(state)
                try:
                    for _ in range(200):
                        if state.upstream_ok:
                            break
                        await asyncio.sleep(0.05)
                    ready.set_result(RunningGuard(f"http://{settings.listen}", f"http://{settings.admin_listen}",
                                                  state, root / "capture", token_file, policy, model, events,
                                                  received))
                    await stop.wait()
                finally:
                    for runner in reversed(runners):
                        await runner.cleanup()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), name="ops-guard", daemon=True)
    thread.start()
    try:
        guard = ready.result(timeout=120)
        yield guard
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()
