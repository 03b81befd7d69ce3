"""A self-contained HTML report of captured traffic: plots as embedded PNGs, no network fetches.

matplotlib (the ``[report]`` extra) draws with the Agg backend; every figure is
base64-embedded, the page has inline CSS only, so it opens from a file, an
e-mail attachment or an air-gapped machine alike.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from guard_agent.policy.model import ACTIONS, SEVERITY, Policy
from guard_agent.tuning.records import Capture, CapturedDecision
from guard_agent.tuning.thresholds import scores_by_name

__all__ = ["ReportInputs", "render_report"]

_COLOURS = {"allow": "#4c9f70", "flag": "#e0b03a", "harden": "#d9822b", "throttle": "#8e6bbf", "block": "#c8423b"}


@dataclass(frozen=True)
class ReportInputs:
    capture: Capture
    policy: Policy | None = None                 # thresholds to mark (default: the last captured policy)
    attack_sessions: frozenset[str] = frozenset()
    title: str = "inference-guard: captured traffic"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thresholds(policy: Policy | None) -> dict[str, list[tuple[float, str, str]]]:
    """score -> [(threshold, rule id, action)] from the policy's single-score gte/gt rules."""
    out: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
    if policy is None:
        return out
    views = [policy.default, *policy.models.values()]
    seen: set[tuple[str, str]] = set()
    for eff in views:
        for rule in eff.rules:
            for c in rule.conditions:
                if c.op in ("gte", "gt") and isinstance(c.value, int | float) and (rule.id, c.fact) not in seen:
                    seen.add((rule.id, c.fact))
                    out[c.fact].append((float(c.value), rule.id, rule.action))
    return out


_TAIL_FLOOR = 1e-6


def _tail(values: np.ndarray | float) -> np.ndarray:
    """Calibrated scores (1 - p-value) on a "1 in N" axis: -log10(1 - score), so 0.999 and 0.99999 stay apart."""
    return np.asarray(-np.log10(np.maximum(1.0 - np.asarray(values, dtype=np.float64), _TAIL_FLOOR)))


def _score_figure(benign: Mapping[str, np.ndarray], attack: Mapping[str, np.ndarray],
                  marks: Mapping[str, list[tuple[float, str, str]]]) -> str | None:
    import matplotlib.pyplot as plt

    names = sorted(set(benign) | set(attack))
    if not names:
        return None
    cols = 2
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        calibrated = name.startswith("ood.")
        scale = _tail if calibrated else (lambda v: np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0))
        top = -np.log10(_TAIL_FLOOR) if calibrated else 1.0
        bins = np.linspace(0.0, top, 51)
        if name in benign:
            ax.hist(scale(benign[name]), bins=bins, color="#4c78a8", alpha=0.8, label=f"benign (n={benign[name].size})")
        if name in attack:
            ax.hist(scale(attack[name]), bins=bins, color="#c8423b", alpha=0.6,
                    label=f"labelled attacks (n={attack[name].size})")
        for i, (value, rule, action) in enumerate(sorted(marks.get(name, []))):
            x = float(scale(value))
            colour = _COLOURS.get(action, "black")
            ax.axvline(x, color=colour, linestyle="--", linewidth=1.4)
            ax.text(x, 0.97 - 0.17 * i, f"{rule}: {action} >= {value:g} ", transform=ax.get_xaxis_transform(),
                    fontsize=7, va="top", ha="right", color=colour,
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0.0, top)
        if calibrated:
            ticks = np.arange(0, int(top) + 1)
            ax.set_xticks(ticks, ["0", *(f"{1 - 10.0 ** -t:.{t}f}" for t in ticks[1:])], fontsize=7)
            ax.set_xlabel("score (1 - p-value), log scale of the tail", fontsize=7)
        ax.legend(fontsize=7, loc="best")
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _timeline_figure(decisions: list[CapturedDecision]) -> str | None:
    import matplotlib.pyplot as plt

    if not decisions:
        return None
    t0 = decisions[0].t
    t = np.array([d.t - t0 for d in decisions])
    span = float(t.max())
    unit, scale = ("hours", 3600.0) if span > 3 * 3600 else (("minutes", 60.0) if span > 180 else ("seconds", 1.0))
    n_bins = 60 if span > 0 else 1
    edges = np.linspace(0.0, span + 1e-6, n_bins + 1) / scale
    fig, ax = plt.subplots(figsize=(11, 3.2))
    bottom = np.zeros(n_bins)
    centres = (edges[:-1] + edges[1:]) / 2
    width = float(edges[1] - edges[0])
    for action in ACTIONS:
        counts, _ = np.histogram([(d.t - t0) / scale for d in decisions if d.action == action], bins=edges)
        if counts.sum() == 0:
            continue
        ax.bar(centres, counts, width=width, bottom=bottom, color=_COLOURS[action], label=action)
        bottom += counts
    ax.set_xlabel(f"{unit} since {datetime.fromtimestamp(t0, UTC):%Y-%m-%d %H:%M:%S} UTC")
    ax.set_ylabel("requests per bin")
    ax.set_title("Decisions over time", fontsize=12)
    ax.legend(fontsize=8, ncol=5, loc="upper left")
    fig.tight_layout()
    return _png(fig)


@dataclass(frozen=True)
class _SessionRow:
    session: str
    risk: float
    requests: int
    refused: int
    actions: Counter[str]
    top_rule: str
    labelled: bool


def _sessions(decisions: Iterable[CapturedDecision], attack: frozenset[str], limit: int = 15) -> list[_SessionRow]:
    acc: dict[str, list[CapturedDecision]] = defaultdict(list)
    for d in decisions:
        acc[d.session].append(d)
    rows = []
    for session, ds in acc.items():
        risk = max((v for d in ds for k, v in d.scores.items() if k.startswith("session.")), default=0.0)
        worst = max(ds, key=lambda d: SEVERITY.get(d.action, 0))
        rows.append(_SessionRow(session, risk, len(ds), sum(d.refused for d in ds), Counter(d.action for d in ds),
                                worst.rule if worst.action != "allow" else "-", session in attack))
    # sessions the guard acted on first (an OOD session can have no session score), then by risk
    rows.sort(key=lambda r: (r.requests > r.actions.get("allow", 0), r.risk, r.refused, r.requests), reverse=True)
    return rows[:limit]


def _sessions_figure(rows: list[_SessionRow]) -> str | None:
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.35 * len(rows) + 1.4)))
    labels = [f"{r.session[:12]}{' (attack)' if r.labelled else ''}" for r in rows][::-1]
    values = [r.risk for r in rows][::-1]
    colours = ["#c8423b" if r.refused else "#4c78a8" for r in rows][::-1]
    ax.barh(labels, values, color=colours)
    for y, r in enumerate(rows[::-1]):
        alerts = r.requests - r.actions.get("allow", 0)
        if alerts:
            ax.text(min(r.risk, 0.75) + 0.01, y, f"{alerts} alerts, {r.refused} refused / {r.requests}",
                    va="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("highest session score seen (max over session.*); red = some requests refused")
    ax.set_title("Top sessions by risk", fontsize=12)
    return _png(fig)  # savefig(bbox_inches="tight") fits the labels


def _roc_figure(benign: Mapping[str, np.ndarray],
                attack: Mapping[str, np.ndarray]) -> tuple[str | None, dict[str, float]]:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    names = sorted(n for n in benign if n in attack and benign[n].size and attack[n].size)
    if not names:
        return None, {}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    aucs: dict[str, float] = {}
    for name in names:
        y = np.r_[np.zeros(benign[name].size), np.ones(attack[name].size)]
        s = np.r_[benign[name], attack[name]]
        fpr, tpr, _ = roc_curve(y, s)
        aucs[name] = float(roc_auc_score(y, s))
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[name]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_xlabel("false-positive rate (benign requests)")
    ax.set_ylabel("true-positive rate (requests of labelled attack sessions)")
    ax.set_title("ROC per score", fontsize=12)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _png(fig), aucs


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:13px} img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} .cards{display:flex;gap:10px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}
.card b{display:block;font-size:20px}
"""


def render_report(inputs: ReportInputs) -> str:
    """The whole page as one string."""
    import matplotlib

    matplotlib.use("Agg")
    cap = inputs.capture
    decisions = cap.decisions
    policy = inputs.policy
    if policy is None and cap.policies and decisions:
        from guard_agent.tuning.replay import policy_from_snapshot

        snap = cap.policies.get(decisions[-1].policy_revision) or list(cap.policies.values())[-1]
        try:
            policy = policy_from_snapshot(snap)
        except ValueError:
            policy = None
    attack_set = inputs.attack_sessions
    benign = scores_by_name(d for d in decisions if d.session not in attack_set)
    attack = scores_by_name(d for d in decisions if d.session in attack_set) if attack_set else {}
    actions = Counter(d.action for d in decisions)
    span = (f"{datetime.fromtimestamp(decisions[0].t, UTC):%Y-%m-%d %H:%M:%S} to "
            f"{datetime.fromtimestamp(decisions[-1].t, UTC):%Y-%m-%d %H:%M:%S} UTC") if decisions else "no decisions"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(inputs.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(inputs.title)}</h1>",
             f"<p class='meta'>{len(decisions)} decisions, {len({d.session for d in decisions})} sessions, {span}; "
             f"{len(cap.files)} capture file(s); policy revisions "
             f"{html.escape(', '.join(sorted({d.policy_revision[:12] for d in decisions})) or '-')}"
             f"{'; thresholds from ' + html.escape(policy.source) if policy is not None else ''}</p>",
             "<div class='cards'>" + "".join(
                 f"<div class='card' style='border-color:{_COLOURS[a]}'>{a}<b>{actions.get(a, 0)}</b></div>"
                 for a in ACTIONS) + "</div>"]
    # overview first (what happened, who), then the detail operators tune with
    rows = _sessions(decisions, attack_set)
    figures = [("Decisions over time", _timeline_figure(decisions)),
               ("Top sessions by risk", _sessions_figure(rows))]
    roc, aucs = _roc_figure(benign, attack) if attack else (None, {})
    if roc is not None:
        figures.append(("ROC curves (labelled attack sessions vs the rest)", roc))
    figures.append(("Score distributions (log count) with the policy's thresholds",
                    _score_figure(benign, attack, _thresholds(policy))))
    for title, src in figures:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(f"<img alt='{html.escape(title)}' src='{src}'>" if src else "<p>No data.</p>")
        if title == "Top sessions by risk" and rows:  # the figure's numbers, readable and copyable
            parts.append(_table(["session", "risk", "requests", "refused", "actions", "strictest rule", "labelled"],
                                ((r.session[:16], f"{r.risk:.3f}", r.requests, r.refused,
                                  ", ".join(f"{a} {n}" for a, n in r.actions.most_common()), r.top_rule,
                                  "attack" if r.labelled else "") for r in rows)))
        if title.startswith("ROC") and aucs:
            parts.append(_table(["score", "AUC"], ((k, f"{v:.3f}") for k, v in sorted(aucs.items()))))
    by_rule = Counter((d.rule, d.action) for d in decisions if d.action != "allow")
    parts.append("<h2>Rules that fired</h2>")
    parts.append(_table(["rule", "action", "requests"], ((r, a, n) for (r, a), n in by_rule.most_common(25)))
                 if by_rule else "<p>None: every request was allowed.</p>")
    by_model = Counter((d.model or "-", d.action) for d in decisions)
    parts.append("<h2>Decisions by model</h2>")
    parts.append(_table(["model", "action", "requests"], ((m, a, n) for (m, a), n in sorted(by_model.items()))))
    parts.append(f"<p class='meta'>generated {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC by guard-agent report; "
                 "session ids are HMACs, no inputs or keys are included.</p></body></html>")
    return "\n".join(parts)
