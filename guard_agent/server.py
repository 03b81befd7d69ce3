"""Run the guard and admin listeners until SIGTERM/SIGINT; SIGHUP reloads the policy.

Shutdown drains: readiness turns false, the listeners stop accepting, in-flight
requests get up to ``shutdown_grace`` seconds, then events are flushed.
"""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from guard_agent.admin import make_admin_app, reload_policy
from guard_agent.app import build_state, make_app
from guard_agent.settings import Settings, parse_hostport
from guard_agent.state import GuardState

__all__ = ["serve", "start_listeners"]


async def start_listeners(state: GuardState) -> tuple[web.AppRunner, web.AppRunner]:
    """Start both listeners; returns their runners (the caller cleans them up)."""
    s = state.settings
    guard_runner = web.AppRunner(make_app(state), access_log=None, handle_signals=False,
                                 max_field_size=max(8190, s.max_header_bytes * 2),
                                 max_line_size=max(8190, s.max_header_bytes * 2),
                                 keepalive_timeout=75, shutdown_timeout=s.shutdown_grace)
    admin_runner = web.AppRunner(make_admin_app(state), access_log=None, handle_signals=False)
    await guard_runner.setup()
    await admin_runner.setup()
    host, port = parse_hostport(s.listen)
    await web.TCPSite(guard_runner, host, port, backlog=1024, reuse_address=True).start()
    ahost, aport = parse_hostport(s.admin_listen)
    await web.TCPSite(admin_runner, ahost, aport, reuse_address=True).start()
    return guard_runner, admin_runner


async def serve(settings: Settings) -> int:
    state = build_state(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload_policy(state, "sighup"))
    guard_runner, admin_runner = await start_listeners(state)
    state.events.log("info", "guard started", guard={"listen": settings.listen, "admin_listen": settings.admin_listen,
                                                     "upstream": settings.upstream,
                                                     "policy_revision": state.policies.current.revision,
                                                     "profile_revision": state.profile.revision})
    await stop.wait()
    state.shutting_down = True
    state.events.log("info", "guard stopping: draining in-flight requests", guard={"in_flight": state.in_flight})
    for site in list(guard_runner.sites):
        await site.stop()
    deadline = loop.time() + settings.shutdown_grace
    while state.in_flight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await guard_runner.cleanup()
    await admin_runner.cleanup()
    state.events.log("info", "guard stopped", guard={"in_flight": state.in_flight})
    state.events.close()
    return 0
