"""The tuning loop end to end: capture on a real guard in front of the real MLServer, then replay, tune and
report (opened in headless Chromium); selftest against a running guard in front of the demo model server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest

from guard_agent.cli import main
from guard_agent.policy.store import default_policy_text
from guard_agent.settings import Settings
from guard_agent.tuning import Capture, read_capture, replay
from tests.conftest import DigitsData, ModelServer, free_port, v2_body

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
CAPTURE_KEY = "integration-test-capture-key-0123456789"


def cli(*argv: str) -> tuple[int, str, str]:
    """Run `guard-agent ...` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


async def post(http: aiohttp.ClientSession, url: str, x: np.ndarray, key: str, rid: str) -> int:
    return (await ask(http, url, x, key, rid))[0]


async def ask(http: aiohttp.ClientSession, url: str, x: np.ndarray, key: str, rid: str) -> tuple[int, int | None]:
    """(status, the class the model answered; None when refused)."""
    headers = {"Content-Type": "application/json", "X-API-Key": key, "X-Request-Id": rid}
    async with http.post(url + INFER, data=v2_body(x), headers=headers) as r:
        body = await r.read()
        if r.status != 200:
            return r.status, None
    data = orjson.loads(body)["outputs"][0]["data"]
    return r.status, int(np.argmax(data)) if len(data) > 1 else int(data[0])


@dataclass
class Captured:
    root: Path
    capture_dir: Path
    policy: Path
    key_file: Path
    sent: int
    alert_events: int
    statuses: dict[str, int]
    attack_keys: tuple[str, ...]
    capture: Capture

    def sessions_of(self, prefix: str) -> set[str]:
        return {d.session for d in self.capture.decisions if d.request_id.startswith(prefix)}


async def _drive(guard_url: str, digits: DigitsData) -> dict[str, int]:
    rng = np.random.default_rng(5)
    statuses: dict[str, int] = {}
    # every client from its own loopback address: unregistered keys from one address also share that
    # address's session (its blocks too), and the captured sessions must stay apart
    clients: dict[str, aiohttp.ClientSession] = {}

    def client(key: str) -> aiohttp.ClientSession:
        if key not in clients:
            local = ("127.0.0." + str(2 + len(clients)), 0)
            clients[key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=local))
        return clients[key]

    try:
        return await _send_all(client, guard_url, digits, rng, statuses)
    finally:
        for http in clients.values():
            await http.close()


async def _send_all(client: Callable[[str], aiohttp.ClientSession], guard_url: str, digits: DigitsData,
                    rng: np.random.Generator, statuses: dict[str, int]) -> dict[str, int]:
    for k in range(12):  # benign clients: held-out digits
        for i, x in enumerate(digits.X_test[rng.choice(len(digits.X_test), 10, replace=False)]):
            statuses[f"benign{k}-{i}"] = await post(client(f"benign-key-{k}"), guard_url, x, f"benign-key-{k}",
                                                    f"benign{k}-{i}")
    for i in range(6):  # out-of-distribution: noise images
        statuses[f"noise-{i}"] = await post(client("noise-key"), guard_url, rng.uniform(0, 16, 64), "noise-key",
                                            f"noise-{i}")
    # black-box probing as HopSkipJump does it: a binary search between two digits of different classes,
    # steered by the answers, then probes around the boundary point; a few more after the block
    a, b = digits.X_test[np.argmax(digits.y_test == 1)], digits.X_test[np.argmax(digits.y_test == 7)]
    label, lo, hi, refused = None, 0.0, 1.0, 0
    for i in range(60):
        t = 0.0 if i == 0 else (lo + hi) / 2 if i <= 12 else hi
        x = np.clip(a + t * (b - a) + rng.normal(0, 0.05, 64), 0, 16)
        statuses[f"probe-{i}"], answer = await ask(client("probe-key"), guard_url, x, "probe-key",
                                                      f"probe-{i}")
        if i == 0:
            label = answer
        elif i <= 12 and answer is not None:
            lo, hi = (lo, t) if answer != label else (t, hi)
        refused += statuses[f"probe-{i}"] == 403
        if refused == 3:
            break
    return statuses


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory, mlserver: ModelServer, digits_profile: str,
             digits: DigitsData) -> Captured:
    """A real guard (capture on, sealed features, allow events sampled out of the log) in front of MLServer."""
    from guard_agent.app import build_state
    from guard_agent.events import CallbackSink
    from guard_agent.server import start_listeners

    root = tmp_path_factory.mktemp("tuning")
    policy = root / "policy.yaml"
    policy.write_text(default_policy_text())
    key_file = root / "capture.key"
    key_file.write_text(CAPTURE_KEY + "\n")
    events: list[dict[str, object]] = []

    async def run() -> dict[str, int]:
        settings = Settings(listen=f"127.0.0.1:{free_port()}", admin_listen=f"127.0.0.1:{free_port()}",
                            upstream=mlserver.url, policy=str(policy), profile=digits_profile,
                            hmac_key="test-hmac-key-for-tuning", capture_dir=str(root / "capture"),
                            capture_key=CAPTURE_KEY, log_sample_allow=0.0)
        state = build_state(settings, sink=CallbackSink(lambda line: events.append(orjson.loads(line))))
        runners = await start_listeners(state)
        try:
            for _ in range(100):
                if state.upstream_ok:
                    break
                await asyncio.sleep(0.05)
            return await _drive(f"http://{settings.listen}", digits)
        finally:  # the capture flushes in the app's cleanup, as on a real shutdown
            for runner in runners:
                await runner.cleanup()

    statuses = asyncio.run(run())
    alerts = sum(1 for e in events if (e.get("event") or {}).get("category") == ["intrusion_detection"])  # type: ignore[union-attr]
    capture = read_capture([root / "capture"], with_features=True)
    return Captured(root, root / "capture", policy, key_file, len(statuses), alerts, statuses,
                    ("noise-key", "probe-key"), capture)


def labels_file(c: Captured) -> Path:
    path = c.root / "attack-sessions.txt"
    path.write_text("# labelled attack sessions\n" + "\n".join(sorted(c.sessions_of("noise") | c.sessions_of("probe")))
                    + "\n")
    return path


class TestCapture:
    def test_every_decision_is_captured_though_the_log_is_sampled(self, captured: Captured) -> None:
        """The capture holds one decision per inference request, while the sampled log holds only the alerts."""
        assert len(captured.capture.decisions) == captured.sent
        assert captured.alert_events < captured.sent
        assert {d.request_id for d in captured.capture.decisions} == set(captured.statuses)
        assert len(captured.capture.policies) == 1

    def test_features_are_sealed_never_plain(self, captured: Captured) -> None:
        """Every decision carries sealed features, and no line holds an input tensor in clear."""
        assert all(d.sealed is not None and d.sealed["alg"] == "A256GCM" for d in captured.capture.decisions)
        for path in captured.capture_dir.glob("*.jsonl"):
            text = path.read_text()
            assert '"inputs"' not in text and '"data"' not in text
            assert oct(path.stat().st_mode & 0o777) == "0o600"


class TestReplayOnCapture:
    def test_same_policy_is_reproduced_exactly(self, captured: Captured) -> None:
        """Replaying the policy the guard ran re-decides every captured request identically."""
        code, out, _ = cli("replay", "--capture", str(captured.capture_dir), "--policy", str(captured.policy),
                           "--fail-on-new-blocks")
        n = captured.sent
        assert code == 0, out
        assert f"captured policy re-decided: {n}/{n} identical" in out
        assert "changed: 0 (0.0%); newly blocked: 0; same action, other rule: 0" in out

    def test_stricter_policy_lists_new_blocks_and_fails_ci(self, captured: Captured) -> None:
        """Blocking at ood.combined >= 0.9 newly blocks captured requests; each example id really scored >= 0.9."""
        strict = captured.root / "strict.yaml"
        strict.write_text(default_policy_text().replace(
            "      ood.combined: {gte: 0.99999}\n    action: flag",
            "      ood.combined: {gte: 0.9}\n    action: block"))
        code, out, err = cli("replay", "--capture", str(captured.capture_dir), "--policy", str(strict),
                             "--fail-on-new-blocks")
        assert code == 1 and "would newly be blocked" in err
        line = next(x for x in out.splitlines() if x.split()[:1] == ["ood-suspicious"] and "cool-down" not in x)
        assert "ood-suspicious (cool-down)" in out  # later requests of a newly blocked session
        ids = re.findall(r"[a-z]+\d*-\d+", line.split("e.g.")[1])
        by_id = {d.request_id: d for d in captured.capture.decisions}
        assert ids and all(by_id[i].scores["ood.combined"] >= 0.9 for i in ids)
        assert "allow -> block" in out

    def test_rescoring_sealed_features_reproduces_the_scores(self, captured: Captured, digits_profile: str) -> None:
        """Decrypting the sealed features and re-scoring under the same profile changes no decision."""
        code, out, _ = cli("replay", "--capture", str(captured.capture_dir), "--policy", str(captured.policy),
                           "--profile", digits_profile, "--capture-key-file", str(captured.key_file))
        assert code == 0
        assert f"re-scored under the new profile: {captured.sent}; without usable sealed features " \
               "(kept captured scores): 0" in out
        assert "changed: 0 (0.0%)" in out
        wrong = captured.root / "wrong.key"
        wrong.write_text("not the key")
        _, out, _ = cli("replay", "--capture", str(captured.capture_dir), "--policy", str(captured.policy),
                        "--profile", digits_profile, "--capture-key-file", str(wrong))
        assert f"re-scored under the new profile: 0; without usable sealed features (kept captured scores): " \
               f"{captured.sent}" in out


class TestTune:
    def test_tuned_policy_validates_and_keeps_benign_traffic_flowing(self, captured: Captured) -> None:
        """Tuning for 1% FPR writes a policy `check` accepts; under it no benign capture is refused and both
        labelled attack sessions are still blocked."""
        out_policy = captured.root / "tuned.yaml"
        code, out, err = cli("tune", "--capture", str(captured.capture_dir), "--labels", str(labels_file(captured)),
                             "--target-fpr", "0.01", "--policy", str(captured.policy), "--out", str(out_policy),
                             "--force")
        assert code == 0, err
        assert re.search(r"^ood\.combined\s+0\.01\*", out, re.M)
        assert "attack TPR" in out and f"wrote {out_policy}" in out
        assert cli("check", str(out_policy))[0] == 0
        from guard_agent.policy import load_policy_file

        policy = load_policy_file(out_policy, available_scores=captured.capture.available_scores()).policy
        result = replay(captured.capture, policy)
        attack = captured.sessions_of("noise") | captured.sessions_of("probe")
        newly_refused_benign = [c for c in result.changes if c.session not in attack and c.after in ("block",
                                                                                                      "throttle")]
        assert newly_refused_benign == []
        assert all(captured.statuses[k] == 200 for k in captured.statuses if k.startswith("benign"))
        still_blocked = {c.session for c in result.changes if c.before == "block"}
        for session in attack:
            blocked_before = {d.request_id for d in captured.capture.decisions
                              if d.session == session and d.action == "block"}
            unblocked = {c.request_id for c in result.changes if c.session == session and c.before == "block"}
            assert blocked_before - unblocked, f"{session} is no longer blocked ({still_blocked})"

    def test_json_prints_the_trade_off_and_the_edits(self, captured: Captured) -> None:
        """--json: one JSON document (the counts, per score a row per FPR, the edits written), no table."""
        out_policy = captured.root / "tuned-json.yaml"
        code, out, err = cli("tune", "--capture", str(captured.capture_dir), "--target-fpr", "0.01",
                             "--policy", str(captured.policy), "--out", str(out_policy), "--force", "--json")
        assert code == 0, err
        doc = orjson.loads(out)
        assert doc["benign"] == captured.sent and doc["out"] == str(out_policy)
        combined = {row["target_fpr"]: row for row in doc["trade_off"]["ood.combined"]}
        assert 0.01 in combined and 0.0 <= combined[0.01]["benign_fpr"] <= 1.0
        assert doc["edits"] and all({"rule", "score", "old", "new"} <= set(e) for e in doc["edits"])
        assert cli("check", str(out_policy))[0] == 0

    def test_labels_are_optional(self, captured: Captured) -> None:
        """Without labels all traffic counts as benign and the table has no attack columns."""
        code, out, _ = cli("tune", "--capture", str(captured.capture_dir), "--target-fpr", "0.05")
        assert code == 0 and "attack TPR" not in out and f"{captured.sent} benign" in out


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class TestReport:
    def test_report_is_self_contained_and_renders(self, captured: Captured, tmp_path: Path) -> None:
        """The report is one HTML file with embedded plots and no network references, and headless Chromium
        renders it into a non-trivial screenshot."""
        html_path = tmp_path / "report.html"
        code, _, err = cli("report", "--capture", str(captured.capture_dir), "--labels", str(labels_file(captured)),
                             "--out", str(html_path))
        assert code == 0, err
        page = html_path.read_text()
        assert page.count("<img ") == 4  # scores, timeline, sessions, ROC (labels given)
        assert page.count("src='data:image/png;base64,") == 4
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
        assert "<script" not in page and "@import" not in page
        assert "ROC" in page and "Top sessions by risk" in page
        assert any(rule in page for rule in ("ood-extreme", "ood-suspicious", "input-out-of-range")), \
            "the sessions table names the strictest rule that fired"
        assert captured.sessions_of("probe").pop()[:16] in page

        browser = _chromium()
        if browser is None:
            pytest.skip("chromium is not installed (apt-get install -y chromium): cannot check the rendering")
        shot = tmp_path / "report.png"
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
             html_path.as_uri()], capture_output=True, timeout=90, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        import matplotlib.image

        pixels = matplotlib.image.imread(str(shot))
        assert pixels.shape[:2] == (2000, 1200)
        rgb = (pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
        assert len(np.unique(rgb, axis=0)) > 200  # plots, not a blank or error page
        assert float(np.mean(rgb.min(axis=1) < 200)) > 0.05  # a good share of non-white pixels


class TestSelftest:
    async def test_selftest_passes_with_defences_and_fails_without(self, start_guard, tmp_path: Path,
                                                                   digits_profile: str, demo_model_url: str) -> None:
        """Against the default policy every defence passes (exit 0); against a policy without rules the attack
        checks fail (exit 1) while benign traffic still passes (read from --json)."""
        guard = await start_guard(demo_model_url, profile=digits_profile)
        code, out, err = await asyncio.to_thread(cli, "selftest", "--target", guard.url, "--max-requests", "300",
                                                 "--time-limit", "60")
        assert code == 0, out + err
        table = [x for x in out.splitlines() if x.startswith(("benign", "OOD", "black-box", "model extr"))]
        assert len(table) == 4 and all(" PASS " in x for x in table)
        sent = sum(1 for e in guard.events if e.get("guard", {}).get("protocol"))
        assert sent <= 300

        open_policy = tmp_path / "open.yaml"
        open_policy.write_text("version: 1\n")
        guard2 = await start_guard(demo_model_url, policy=str(open_policy), profile=digits_profile)
        code, out, _ = await asyncio.to_thread(cli, "selftest", "--target", guard2.url, "--max-requests", "150",
                                               "--time-limit", "60", "--rate", "200", "--json")
        assert code == 1
        passed = {r["defence"].split()[0]: r["passed"] for r in orjson.loads(out)}  # --json: stdout is JSON only
        assert passed["benign"] and not passed["OOD"] and not passed["black-box"] and not passed["model"]


class TestSelftestVerdicts:
    async def test_rate_limit_is_not_mistaken_for_a_defence(self, start_guard, tmp_path: Path,
                                                            digits_profile: str, demo_model_url: str) -> None:
        """Attacks stopped only by 429s (a tight rate limit, no rules) fail the check and say why."""
        policy = tmp_path / "tight.yaml"
        policy.write_text("version: 1\nrate_limit: {requests_per_second: 1, burst: 3}\n")
        guard = await start_guard(demo_model_url, policy=str(policy), profile=digits_profile)
        code, out, _ = await asyncio.to_thread(cli, "selftest", "--target", guard.url, "--max-requests", "80",
                                               "--time-limit", "60", "--rate", "50")
        assert code == 1
        evasion = next(x for x in out.splitlines() if x.startswith("black-box"))
        assert " FAIL " in evasion and "not by a detector (403)" in evasion and "[429]" in evasion


def test_capture_settings_reach_the_hook(tmp_path: Path) -> None:
    """GUARD_CAPTURE_* settings configure the hook: size, file count and sealing."""
    from guard_agent.app import build_state
    from guard_agent.capture import CaptureWriter
    from guard_agent.events import CallbackSink

    s = replace(Settings(hmac_key="test-hmac-key-xx"), capture_dir=str(tmp_path), capture_max_bytes=8192,
                capture_max_files=2)
    state = build_state(s, sink=CallbackSink(lambda _: None))
    assert isinstance(state.capture, CaptureWriter)
    assert state.capture.max_bytes == 8192 and state.capture.max_files == 2 and state.capture._key is None
    state.capture.close()
