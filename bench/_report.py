"""Tables and ratios for bench/proxy.py: medians over repeats, added latency vs direct, targets."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

Run = dict[str, Any]

# the request path's targets (CPU per request, throughput, added p99)
TARGET_CPU_US = 300.0  # guard CPU per request at 1000 req/s, every detector and tracker on
TARGET_CPU_US_NO_RULES = 150.0  # the same for the guard without rules (guard-off)
TARGET_RPS = 3000.0  # closed loop on one core
TARGET_ADDED_P99_MS = 2.0  # at 500 req/s, vs direct


def _values(runs: Iterable[Run], key: str) -> list[float]:
    return [float(r[key]) for r in runs if r.get(key) is not None]


def med(runs: Iterable[Run], key: str) -> float | None:
    vals = _values(runs, key)
    return statistics.median(vals) if vals else None


def spread(runs: Sequence[Run], key: str) -> str:
    vals = _values(runs, key)
    return f"{min(vals):.4g}..{max(vals):.4g}" if vals else "-"


def fmt(value: float | None, spec: str = ".3g", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def select(runs: Sequence[Run], config: str, kind: str) -> list[Run]:
    return [r for r in runs if r["config"] == config and r["kind"] == kind]


def non2xx_share(run: Run) -> float:
    """Share of requests answered with a non-2xx status or not answered at all."""
    if run["kind"] == "wrk":
        return float(run["non2xx"]) / run["requests"] if run["requests"] else 0.0
    return 1.0 - float(run["ok"]) / (run["measured"] or 1)


def main_table(runs: Sequence[Run], configs: Sequence[str], rates: Sequence[int]) -> list[str]:
    """Medians over repeats, one row per configuration."""
    head = (
        f"{'configuration':<29}{'wrk req/s':>10}{'cpu%':>6}{'us/req':>8}{'fail':>7}"
        + "".join(f"{f'p50@{r}':>9}{f'p99@{r}':>9}{f'us/req@{r}':>12}" for r in rates)
        + f"{'gen lag p99':>12}{'core0 other%':>13}{'core1 %':>8}"
    )
    lines = [head, "-" * len(head)]
    for cfg in configs:
        wrk = select(runs, cfg, "wrk")
        row = (
            f"{cfg:<29}{fmt(med(wrk, 'rps'), '.0f'):>10}{fmt(med(wrk, 'cpu_util'), '.0f', 100):>6}"
            f"{fmt(med(wrk, 'cpu_us_per_req'), '.0f'):>8}"
        )
        shares = [non2xx_share(r) for r in runs if r["config"] == cfg]
        row += f"{fmt(max(shares) if shares else None, '.1%'):>7}"
        for rate in rates:
            ol = select(runs, cfg, f"open{rate}")
            row += (
                f"{fmt(med(ol, 'p50_ms'), '.2f'):>9}{fmt(med(ol, 'p99_ms'), '.2f'):>9}"
                f"{fmt(med(ol, 'cpu_us_per_req'), '.0f'):>12}"
            )
        lag = max(
            (r["timer_lag_p99_ms"] for r in runs if r["config"] == cfg and r.get("timer_lag_p99_ms") is not None),
            default=None,
        )
        others = med([r for r in runs if r["config"] == cfg], "proxy_core_others_util")
        load = med([r for r in runs if r["config"] == cfg], "load_core_util")
        row += f"{fmt(lag, '.2f'):>12}{fmt(others, '.0f', 100):>13}{fmt(load, '.0f', 100):>8}"
        lines.append(row)
    lines += [
        "",
        "wrk req/s: closed loop (1 wrk thread, keep-alive connections); cpu%: the proxy's CPU use during it;",
        "us/req: the proxy's CPU time (utime+stime from /proc/<pid>/stat) per request; for 'direct' that is the",
        "stub upstream's. p50/p99 in ms from the scheduled send time (open loop; 'inf': some requests got",
        "no answer within the drain time, i.e. the target could not sustain the rate). fail: worst share,",
        "over all runs, of requests answered with a non-2xx status (the guard's 403/429 included) or not at",
        "all. gen lag p99: worst p99 of how late the generator's timer woke (its own lateness).",
        "core0 other%: CPU used on the proxy core by processes other than the proxy (noise from the machine);",
        "core1 %: total use of the load core (generator + stub upstream + anything else).",
        "All figures: median over repeats.",
    ]
    return lines


def _added(runs: Sequence[Run], cfg: str, kind: str, key: str) -> list[float]:
    """Per repeat: config minus direct in the same repeat (interleaved, so drift cancels)."""
    out = []
    for r in select(runs, cfg, kind):
        base = [d for d in select(runs, "direct", kind) if d["rep"] == r["rep"]]
        if base and r.get(key) is not None and base[0].get(key) is not None:
            out.append(float(r[key]) - float(base[0][key]))
    return out


def ratio_lines(runs: Sequence[Run], proxies: Sequence[str], rates: Sequence[int]) -> list[str]:
    lines = []
    nginx_rps = med(select(runs, "nginx", "wrk"), "rps")
    direct_rps = med(select(runs, "direct", "wrk"), "rps")
    for cfg in proxies:
        rps = med(select(runs, cfg, "wrk"), "rps")
        if rps and nginx_rps and cfg != "nginx":
            per_rep = [
                r["rps"] / n["rps"]
                for r in select(runs, cfg, "wrk")
                for n in select(runs, "nginx", "wrk")
                if n["rep"] == r["rep"] and n["rps"]
            ]
            lines.append(
                f"throughput {cfg}/nginx: {rps / nginx_rps:.3f}  (per repeat {', '.join(f'{x:.3f}' for x in per_rep)})"
            )
    if direct_rps and nginx_rps:
        nginx_cpu = med(select(runs, "nginx", "wrk"), "cpu_util") or 0.0
        lines.append(
            f"throughput nginx/direct: {nginx_rps / direct_rps:.3f}; nginx proxy CPU during wrk: "
            f"{nginx_cpu:.0%} of its core"
            + (
                "  (below ~90%: nginx is limited by the load core, so guard/nginx is flattering)"
                if nginx_cpu < 0.9
                else ""
            )
        )
    nginx_us = med(select(runs, "nginx", "wrk"), "cpu_us_per_req")
    if nginx_us:
        parts = [f"nginx {1e6 / nginx_us:.0f} req/s"]
        for cfg in proxies:
            us = med(select(runs, cfg, "wrk"), "cpu_us_per_req")
            if us and cfg != "nginx":
                parts.append(f"{cfg} {1e6 / us:.0f} req/s ({nginx_us / us:.3f}x nginx)")
        lines.append(
            "CPU-bound capacity on a core of its own (1e6 / CPU us per request under wrk; robust to other "
            "processes sharing the core, not to a slow core): " + "; ".join(parts)
        )
    for rate in rates:
        for key in ("p50_ms", "p99_ms"):
            parts = []
            for cfg in proxies:
                added = _added(runs, cfg, f"open{rate}", key)
                if added:
                    parts.append(f"{cfg} {statistics.median(added):+.3f}")
            if parts:
                lines.append(
                    f"added {key[:3]} vs direct @{rate} req/s (ms, median of per-repeat differences): "
                    + "; ".join(parts)
                )
    return lines


def target_lines(runs: Sequence[Run], guards: Sequence[str]) -> list[str]:
    lines = []
    for cfg in guards:
        cpu = med(select(runs, cfg, "open1000"), "cpu_us_per_req")
        cpu_target = TARGET_CPU_US_NO_RULES if cfg.partition("@")[0] == "guard-off" else TARGET_CPU_US
        rps = med(select(runs, cfg, "wrk"), "rps")
        added = _added(runs, cfg, "open500", "p99_ms")
        p99 = statistics.median(added) if added else None
        checks = [
            ("CPU/request @1000 req/s", f"<= {cpu_target:.0f} us", cpu is not None and cpu <= cpu_target,
             f"{fmt(cpu, '.0f')} us"),
            ("closed-loop req/s", f">= {TARGET_RPS:.0f}", bool(rps and rps >= TARGET_RPS), f"{fmt(rps, '.0f')}"),
            ("added p99 @500 req/s", f"<= {TARGET_ADDED_P99_MS} ms", p99 is not None and p99 <= TARGET_ADDED_P99_MS,
             f"{fmt(p99, '.2f')} ms"),
        ]
        for label, target, ok, shown in checks:
            lines.append(f"{cfg:<29}{label:<26}{shown:>12}   target {target:<10} {'MET' if ok else 'MISSED'}")
    return lines


def decision_lines(runs: Sequence[Run], guards: Sequence[str]) -> list[str]:
    lines = []
    for cfg in guards:
        total: dict[str, int] = {}
        for r in runs:
            if r["config"] == cfg:
                for k, v in r.get("decisions", {}).items():
                    total[k] = total.get(k, 0) + v
        n = sum(total.values()) or 1
        mix = ", ".join(f"{k} {v / n:.1%}" for k, v in sorted(total.items(), key=lambda kv: -kv[1]))
        lines.append(f"{cfg:<29}{mix}  ({n} requests)")
    return lines


def generator_lines(runs: Sequence[Run], rates: Sequence[int]) -> list[str]:
    """Did the open-loop generator keep up? Judged on the direct runs (cheapest target)."""
    lines = []
    for rate in rates:
        direct = select(runs, "direct", f"open{rate}")
        if not direct:
            continue
        achieved = min(r["achieved_send_rate"] for r in direct)
        lag50 = med(direct, "timer_lag_p50_ms")
        lag99 = max(r["timer_lag_p99_ms"] or 0.0 for r in direct)
        p50 = med(direct, "p50_ms")
        ok = achieved >= 0.99 * rate and lag99 < 1.0
        lines.append(
            f"@{rate} req/s against direct: sent {achieved:.1f} req/s (min over repeats); timer lateness "
            f"p50 {fmt(lag50, '.3f')} ms, p99 {lag99:.3f} ms (worst); direct p50 {fmt(p50, '.3f')} ms -> "
            + ("keeps up" if ok else "LAGS at the tail: p99 figures include generator delay (see core0/core1 load)")
        )
    return lines
