"""An OpenAI-compatible LLM server behind the guard: llama-cpp-python's server (llama.cpp built from source by
pip) serving a tiny random-weight llama written in the test with the gguf package."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests._support.servers import free_port
from tests.conftest import wait_http
from tests.text._tiny_llama import write_tiny_llama
from tests.text.conftest import stop

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is built and installed by .ci/run")

JSON = {"Content-Type": "application/json"}
POLICY = """
version: 1
mode: enforce
rate_limit: {requests_per_second: 1000, burst: 1000}
hardening: {round_digits: 1, top_k: 1, label_only: false}
rules:
  - id: logit-bias-sweep
    description: logit_bias over many tokens at once
    when: {request.logit_bias: {gte: 50}}
    action: block
    cooldown_seconds: 0
  - id: logit-bias-with-logprobs
    description: logit_bias together with log-probabilities (the logit-extraction recipe)
    when: {request.logit_bias: {gte: 1}, request.top_logprobs: {gte: 1}}
    action: harden
  - id: black-box-attack
    description: many near-duplicate prompts
    when: {session.fingerprint: {gte: 0.95}}
    action: block
"""


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama_cpp.server on a free port with the tiny model (chat, completions, embeddings)."""
    root = tmp_path_factory.mktemp("llama")
    model = write_tiny_llama(root / "tiny.gguf")
    port = free_port()
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
                                 "127.0.0.1", "--port", str(port), "--embedding", "true", "--n_ctx", "512",
                                 "--seed", "1"], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=60, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
async def llm_guard(start_guard: Any, llama_server: str, tmp_path: Path, text_profile_dir: Path) -> Any:
    """The guard with a text profile fitted on reference prompts (here: the fortunes corpus)."""
    return await start_guard(llama_server, policy=policy_file(tmp_path / "policy.yaml", POLICY),
                             profile=str(text_profile_dir))


def rid(name: str) -> str:
    """A request id llama-cpp-python's server accepts: its starlette-context plugin refuses (400) any
    X-Request-Id that is not a UUID, and the guard passes the client's id through."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


async def call(guard: Any, path: str, doc: dict[str, Any], name: str, key: str = "llm-key") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(
            guard.url + path, data=orjson.dumps(doc), headers={**JSON, "X-Request-Id": rid(name), "X-API-Key": key}
    ) as r:
        return r.status, await r.json(content_type=None)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 6, "seed": 1, **extra}


class TestLLMRoutes:
    async def test_chat_usage_and_scores(self, llm_guard: Any) -> None:
        """A chat completion is forwarded and answered; its event has the usage the server reported and the
        prompt's text scores, and no prompt text."""
        status, doc = await call(llm_guard, "/v1/chat/completions", chat("hello secret world"), "chat-1")
        assert status == 200
        assert doc["choices"][0]["message"]["role"] == "assistant"
        (event,) = llm_guard.events_for(rid("chat-1"))
        assert event["event"]["action"] == "allow"
        assert event["guard"]["llm"]["prompt_tokens"] == doc["usage"]["prompt_tokens"] > 0
        assert event["guard"]["llm"]["completion_tokens"] == doc["usage"]["completion_tokens"] > 0
        assert "text.invisible" in event["guard"]["scores"]
        assert "secret world" not in orjson.dumps(event).decode()

    async def test_completions_logprobs(self, llm_guard: Any) -> None:
        """Completions with logprobs pass unchanged when no rule asks for hardening."""
        status, doc = await call(llm_guard, "/v1/completions",
                                 {"prompt": "the model", "max_tokens": 4, "logprobs": 3}, "cmpl-1")
        assert status == 200
        assert len(doc["choices"][0]["logprobs"]["token_logprobs"]) == 4
        (event,) = llm_guard.events_for(rid("cmpl-1"))
        assert event["guard"]["llm"]["completion_tokens"] == 4

    async def test_embeddings(self, llm_guard: Any) -> None:
        """Embeddings of two inputs: two rows scored, the server's vectors returned."""
        status, doc = await call(llm_guard, "/v1/embeddings", {"input": ["hello world", "good day"]}, "emb-1")
        assert status == 200 and len(doc["data"]) == 2
        (event,) = llm_guard.events_for(rid("emb-1"))
        assert event["guard"]["rows"] == 2

    async def test_token_id_prompt_refused(self, llm_guard: Any) -> None:
        """Token-id prompts cannot be scored as text: 400 with a clear message, one reject event."""
        status, doc = await call(llm_guard, "/v1/completions", {"prompt": [1, 2, 3]}, "tok-1")
        assert status == 400 and "token-id prompts" in doc["error"]["message"]
        (event,) = llm_guard.events_for(rid("tok-1"))
        assert event["event"]["action"] == "reject"

    async def test_streaming_relayed_chunk_by_chunk(self, llm_guard: Any) -> None:
        """A streamed chat answer arrives as server-sent events in several reads, ending with [DONE]; the
        event counts the chunks that carried text when the server sends no usage."""
        reads: list[bytes] = []
        async with aiohttp.ClientSession() as http, http.post(
                llm_guard.url + "/v1/chat/completions", data=orjson.dumps(chat("hello", stream=True)),
                headers={**JSON, "X-Request-Id": rid("stream-1"), "X-API-Key": "k2"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for chunk in r.content.iter_any():
                reads.append(chunk)
        body = b"".join(reads)
        events = [line for line in body.split(b"\n") if line.startswith(b"data:")]
        assert events[-1].strip() == b"data: [DONE]"
        assert len(events) >= 4
        for _ in range(20):
            if llm_guard.events_for(rid("stream-1")):
                break
            await asyncio.sleep(0.05)
        (event,) = llm_guard.events_for(rid("stream-1"))
        assert event["guard"]["llm"]["usage_counted"] is True
        with_text = [line for line in events[:-1] if orjson.loads(line[5:])["choices"][0]["delta"].get("content")]
        assert event["guard"]["llm"]["completion_tokens"] == len(with_text) >= 1

    async def test_logit_bias_with_logprobs_hardened(self, llm_guard: Any, llama_server: str) -> None:
        """logit_bias with top_logprobs is hardened: the bias is dropped before the model sees it (a +100 bias
        would force one token) and log-probabilities come back rounded to 1 digit, top-1 only."""
        token = 300
        doc = chat("hello world", logprobs=True, top_logprobs=3, logit_bias={str(token): 100})
        async with aiohttp.ClientSession() as http, http.post(llama_server + "/v1/chat/completions",
                                                            data=orjson.dumps(doc), headers=JSON) as r:
            direct = await r.json()
        status, guarded = await call(llm_guard, "/v1/chat/completions", doc, "bias-1")
        assert status == 200
        forced = direct["choices"][0]["message"]["content"]
        assert guarded["choices"][0]["message"]["content"] != forced
        for tok in guarded["choices"][0]["logprobs"]["content"]:
            assert tok["logprob"] == round(tok["logprob"], 1)
            assert len(tok["top_logprobs"]) <= 1
        (event,) = llm_guard.events_for(rid("bias-1"))
        assert event["event"]["action"] == "harden" and event["guard"]["hardening"] == "applied"

    async def test_wide_logit_bias_blocked(self, llm_guard: Any) -> None:
        """A request biasing 50 tokens or more is blocked by the request.logit_bias rule."""
        doc = chat("hello", logit_bias={str(t): -100 for t in range(260, 320)})
        status, _ = await call(llm_guard, "/v1/chat/completions", doc, "wide-1")
        assert status == 403
        (event,) = llm_guard.events_for(rid("wide-1"))
        assert event["rule"]["name"] == "logit-bias-sweep"

    @pytest.mark.xfail(strict=True, reason="a near-duplicate counts as attack evidence only when "
                       "the answers straddle a class boundary; an LLM answer has no class, so one prompt repeated "
                       "does not raise session.fingerprint. The sweep is still caught by its biased-token count "
                       "(test_logit_bias_sweep_tracked_over_the_session, the default llm-logit-bias-sweep rule).")
    async def test_scripted_logit_bias_sweep_blocked(self, llm_guard: Any) -> None:
        """The logit-extraction sweep (one prompt, one biased token per query, over many tokens) is stopped by
        the session trackers before it covers the vocabulary."""
        statuses = []
        for t in range(260, 380):
            doc = chat("what is the answer", logit_bias={str(t): 100}, max_tokens=1)
            status, _ = await call(llm_guard, "/v1/chat/completions", doc, f"sweep-{t}", key="sweeper")
            statuses.append(status)
        assert 403 in statuses
        assert statuses.index(403) < 60, statuses.index(403)

    async def test_benign_chat_session_not_blocked(self, llm_guard: Any) -> None:
        """Forty different prompts with a few exact retries, logprobs asked without logit_bias: all answered."""
        from guard_agent.attacks import fortune_texts

        prompts = fortune_texts("food")[:36]
        prompts += prompts[:4]
        for i, prompt in enumerate(prompts):
            status, _ = await call(llm_guard, "/v1/chat/completions", chat(prompt[:300], logprobs=True, top_logprobs=2,
                                                                           max_tokens=2), f"benign-{i}", key="benign")
            assert status == 200, i


BUDGET_POLICY = """
version: 1
mode: enforce
rate_limit: {requests_per_second: 1000, burst: 1000}
rules:
  - id: token-budget
    description: the session used its token budget
    when: {session.tokens: {gte: 200}}
    action: throttle
"""
SWEEP_POLICY = """
version: 1
mode: enforce
rate_limit: {requests_per_second: 1000, burst: 1000}
rules:
  - id: logit-sweep
    description: many biased tokens with log-probabilities over the session
    when: {session.logit_bias_tokens: {gte: 30}}
    action: block
"""


def policy_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
async def budget_guard(start_guard: Any, llama_server: str, tmp_path: Path) -> Any:
    return await start_guard(llama_server, policy=policy_file(tmp_path / "budget.yaml", BUDGET_POLICY))


@pytest.fixture
async def sweep_guard(start_guard: Any, llama_server: str, tmp_path: Path) -> Any:
    return await start_guard(llama_server, policy=policy_file(tmp_path / "sweep.yaml", SWEEP_POLICY))


class TestLLMSessions:
    async def test_token_budget_throttles(self, budget_guard: Any) -> None:
        """Once a session's prompt + completion tokens (from the answers' usage) reach the budget, its next
        request gets 429 with Retry-After; another session is unaffected."""
        used, statuses = 0, []
        for i in range(20):
            status, doc = await call(budget_guard, "/v1/chat/completions", chat("hello world", max_tokens=8),
                                     f"budget-{i}", key="spender")
            statuses.append(status)
            if status == 200:
                used += doc["usage"]["total_tokens"]
            else:
                break
        assert statuses[-1] == 429 and used >= 200
        assert used - 60 < 200  # throttled on the first request after the budget, not later
        (event,) = budget_guard.events_for(rid(f"budget-{len(statuses) - 1}"))
        assert event["rule"]["name"] == "token-budget"
        status, _ = await call(budget_guard, "/v1/chat/completions", chat("hello"), "budget-other", key="other")
        assert status == 200

    async def test_streamed_tokens_counted(self, budget_guard: Any) -> None:
        """Streamed answers without usage count toward the budget too (text chunks + ~4 characters per prompt
        token), so streaming does not escape it."""
        statuses = []
        for i in range(40):
            async with aiohttp.ClientSession() as http, http.post(
                    budget_guard.url + "/v1/chat/completions", data=orjson.dumps(chat("hello world", stream=True)),
                    headers={**JSON, "X-Request-Id": rid(f"sbudget-{i}"), "X-API-Key": "streamer"}) as r:
                await r.read()
                statuses.append(r.status)
            if r.status != 200:
                break
        assert statuses[-1] == 429 and len(statuses) < 40

    async def test_logit_bias_sweep_tracked_over_the_session(self, sweep_guard: Any) -> None:
        """One biased token per request with top_logprobs (each request harmless alone): the session's count of
        biased tokens reaches the rule's limit and the sweep is blocked at the 31st request."""
        statuses = []
        for t in range(260, 300):
            doc = chat("what", logit_bias={str(t): 50}, logprobs=True, top_logprobs=2, max_tokens=1)
            status, _ = await call(sweep_guard, "/v1/chat/completions", doc, f"lsweep-{t}", key="lsweeper")
            statuses.append(status)
        assert statuses[:30] == [200] * 30
        assert statuses[30] == 403
        (event,) = sweep_guard.events_for(rid("lsweep-290"))
        assert event["rule"]["name"] == "logit-sweep"


async def test_default_policy_hardens_logit_bias_with_logprobs(start_guard: Any, llama_server: str) -> None:
    """The shipped policy hardens logit_bias + top_logprobs (bias dropped, top-1 log-probabilities rounded)."""
    guard = await start_guard(llama_server)
    doc = chat("hello world", logprobs=True, top_logprobs=3, logit_bias={"300": 100})
    status, answer = await call(guard, "/v1/chat/completions", doc, "default-bias")
    assert status == 200
    for tok in answer["choices"][0]["logprobs"]["content"]:
        assert len(tok["top_logprobs"]) <= 1 and tok["logprob"] == round(tok["logprob"], 1)
    (event,) = guard.events_for(rid("default-bias"))
    assert event["rule"]["name"] == "llm-logit-bias-with-logprobs"
    assert event["threat"]["technique"]["id"] == "AML.T0024.002"


@pytest.mark.redis
async def test_token_budget_shared_through_redis(start_guard: Any, llama_server: str, tmp_path: Path,
                                                 redis_prefix: str) -> None:
    """Two guards sharing Redis count one key's tokens together: alternating between them, the session is
    throttled once the sum of both guards' answers crossed the budget."""
    url = f"redis://127.0.0.1:6379/0?key_prefix={redis_prefix}"
    policy = policy_file(tmp_path / "budget.yaml", BUDGET_POLICY)
    guards = [await start_guard(llama_server, policy=policy, redis_url=url, hmac_key="shared") for _ in range(2)]
    used, status = 0, 200
    try:
        for i in range(20):
            status, doc = await call(guards[i % 2], "/v1/chat/completions", chat("hello world", max_tokens=8),
                                     f"redis-budget-{i}", key="shared-spender")
            if status != 200:
                break
            used += doc["usage"]["total_tokens"]
    finally:
        for g in guards:
            await g.state.sessions.aclose()
    assert status == 429
    assert 200 <= used < 260


async def test_streamed_answer_hardened_chunk_by_chunk(start_guard: Any, llama_server: str) -> None:
    """A streamed answer under harden: every chunk's log-probabilities are cut to top-1 and rounded on the way,
    and the stream still ends with [DONE]."""
    guard = await start_guard(llama_server)
    doc = chat("hello world", logprobs=True, top_logprobs=3, logit_bias={"300": 100}, stream=True)
    async with aiohttp.ClientSession() as http, http.post(
            guard.url + "/v1/chat/completions", data=orjson.dumps(doc),
            headers={**JSON, "X-Request-Id": rid("stream-harden"), "X-API-Key": "k3"}) as r:
        assert r.status == 200
        body = await r.read()
    lines = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
    assert lines[-1] == b"[DONE]"
    tokens = [tok for line in lines[:-1] for choice in orjson.loads(line)["choices"]
              for tok in ((choice.get("logprobs") or {}).get("content") or [])]
    assert tokens
    for tok in tokens:
        assert len(tok["top_logprobs"]) <= 1 and tok["logprob"] == round(tok["logprob"], 1)
