"""TLS on the guard port with real certificates made here: serving, reload on change, mTLS, admin token."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from guard_agent.demo import DigitsModel
from tests._support.rawhttp import port_of
from tests._support.tls import Pem, issue, make_ca
from tests._support.waiting import wait_for
from tests.conftest import v2_body


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def client_context(ca: Pem, client: Pem | None = None, tmp: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.cert.decode())
    if client is not None:
        assert tmp is not None
        ctx.load_cert_chain(write(tmp / "client.crt", client.cert), write(tmp / "client.key", client.key))
    return ctx


async def served_serial(port: int, ca: Pem) -> int:
    """The serial number of the certificate the guard presents to a new connection."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca), server_hostname="127.0.0.1")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def _serial_is(port: int, ca: Pem, serial: int) -> bool:
    return await served_serial(port, ca) == serial


class TestTls:
    async def test_https_served_and_plain_http_refused(self, tmp_path: Path, demo_model_url: str, start_guard,
                                                       demo_model: DigitsModel) -> None:
        """A client trusting the CA gets 200 over HTTPS; plain HTTP on the TLS port gets no HTTP answer."""
        ca = make_ca("test-ca")
        srv = issue(ca, "guard", server=True)
        guard = await start_guard(demo_model_url, tls_cert_file=write(tmp_path / "s.crt", srv.cert),
                                  tls_key_file=write(tmp_path / "s.key", srv.key))
        https = guard.url.replace("http://", "https://")
        body = v2_body(demo_model.X_test[0])
        async with aiohttp.ClientSession() as http:
            async with http.post(https + "/v2/models/digits/infer", data=body, ssl=client_context(ca),
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200
                assert "outputs" in await r.json()
            with pytest.raises(aiohttp.ClientError):
                async with http.post(guard.url + "/v2/models/digits/infer", data=body) as r:
                    await r.read()
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.get(https + "/v2/health/ready", ssl=client_context(make_ca("other-ca"))) as r:
                    await r.read()

    async def test_certificate_reload_and_broken_pair(self, tmp_path: Path, demo_model_url: str, start_guard) -> None:
        """A renewed certificate is served to new connections; a half-written one is refused, the last good
        stays, and the failure is logged and counted."""
        ca = make_ca("test-ca")
        first, second = issue(ca, "guard", server=True), issue(ca, "guard", server=True)
        cert, key = tmp_path / "s.crt", tmp_path / "s.key"
        guard = await start_guard(demo_model_url, tls_cert_file=write(cert, first.cert),
                                  tls_key_file=write(key, first.key))
        port = port_of(guard.url)
        assert await served_serial(port, ca) == first.obj.serial_number
        write(key, second.key)
        write(cert, second.cert)
        assert await wait_for(lambda: _serial_is(port, ca, second.obj.serial_number))
        write(cert, second.cert[: len(second.cert) // 2])  # half-written
        assert await wait_for(lambda: any(e["message"] == "tls rejected: last good kept" for e in guard.events))
        assert await served_serial(port, ca) == second.obj.serial_number
        registry = guard.state.metrics.registry
        assert registry.get_sample_value("inference_guard_credential_reloads_total",
                                         {"file": "tls", "result": "failed"}) >= 1
        assert registry.get_sample_value("inference_guard_credential_reloads_total",
                                         {"file": "tls", "result": "ok"}) >= 1


    def test_broken_key_file_is_not_quoted(self, tmp_path: Path) -> None:
        """A damaged or foreign key file is refused naming the files, never with a piece of the key."""
        from guard_agent.tls import TlsError, build_context

        srv = issue(make_ca("test-ca"), "guard", server=True)
        lines = srv.key.decode().splitlines()
        body = lines[1]
        damaged = "\n".join([lines[0], "!" + body[1:], *lines[2:]]) + "\n"
        for name, text in (("damaged.key", damaged), ("text.key", f"hmac: {body}\n")):
            with pytest.raises(TlsError, match="cannot load certificate") as info:
                build_context(write(tmp_path / "s.crt", srv.cert), write(tmp_path / name, text.encode()))
            assert body[1:20] not in str(info.value), name


class TestMutualTls:
    async def test_client_certificates_required(self, tmp_path: Path, demo_model_url: str, start_guard,
                                                demo_model: DigitsModel) -> None:
        """With a client CA set, only clients presenting a certificate from that CA are served."""
        server_ca, client_ca, rogue_ca = make_ca("server-ca"), make_ca("client-ca"), make_ca("rogue-ca")
        srv = issue(server_ca, "guard", server=True)
        guard = await start_guard(demo_model_url, tls_cert_file=write(tmp_path / "s.crt", srv.cert),
                                  tls_key_file=write(tmp_path / "s.key", srv.key),
                                  tls_client_ca_file=write(tmp_path / "clients.pem", client_ca.cert))
        https = guard.url.replace("http://", "https://") + "/v2/models/digits/infer"
        body = v2_body(demo_model.X_test[0])
        headers = {"Content-Type": "application/json"}
        good = client_context(server_ca, issue(client_ca, "svc", server=False), tmp_path)
        (tmp_path / "rogue").mkdir()
        rogue = client_context(server_ca, issue(rogue_ca, "svc", server=False), tmp_path / "rogue")
        async with aiohttp.ClientSession() as http:
            async with http.post(https, data=body, ssl=good, headers=headers) as r:
                assert r.status == 200
            for ctx in (client_context(server_ca), rogue):
                with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                    async with http.post(https, data=body, ssl=ctx, headers=headers) as r:
                        await r.read()
        assert sum(1 for e in guard.events if (e.get("http") or {}).get("request")) == 1


class TestAdminToken:
    async def test_admin_needs_the_exact_token(self, demo_model_url: str, start_guard) -> None:
        """/admin/* answers 401 without or with a wrong token and 200 with the configured one; probes stay open."""
        guard = await start_guard(demo_model_url)
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-admin-token"}):
                async with http.get(guard.admin_url + "/admin/policy", headers=headers) as r:
                    assert r.status == 401
            async with http.get(guard.admin_url + "/admin/policy",
                                headers={"Authorization": "Bearer test-admin-token"}) as r:
                assert r.status == 200
            async with http.get(guard.admin_url + "/readyz") as r:
                assert r.status == 200
