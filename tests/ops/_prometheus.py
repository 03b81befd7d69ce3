"""A real Prometheus (Debian's ``prometheus`` package) for the operator tests, on loopback.

It scrapes the guard's admin port every second with the labels Kubernetes service discovery would
give (namespace, pod), loads the shipped alert rules, and is queried through its HTTP API.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests._support.servers import free_port

JOB = "inference-guard-admin"
LABELS = {"namespace": "models", "pod": "digits-0"}


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer:
    def __init__(self, root: Path, target: str, rule_files: list[Path]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(p) for p in rule_files],
                  "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target], "labels": LABELS}]}]}
        self.config = root / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = root / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = prometheus_binary()
        assert binary is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.root / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; the decoded answer whatever its status (query errors come back as 400/422)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = r.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        answer: dict[str, Any] = orjson.loads(body)
        return answer

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll until ``expr`` has a result; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.query(expr)
            result: list[dict[str, Any]] = answer.get("data", {}).get("result", [])
            if answer.get("status") == "success" and result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr}: no result within {timeout}s ({answer})")
            time.sleep(0.5)
