"""Detection matrix: the default policy on five models and every traffic shape, benign and hostile.

Models (``bench/_matrix_models.py``, scikit-learn's bundled data): a small tabular random forest (wine,
124 reference rows), a mid tabular SVC (breast cancer, binary), integer codes with many exact repeats
(gradient boosting), 8x8 digits with an MLP, and a 128-d embedding-like input (binary logistic regression).
Each profile is fitted by ``guard-agent fit``'s own code on the training split; all traffic comes from the
held-out split. One set of defaults (the shipped default policy and settings) for every model.

Benign shapes (``bench/_matrix_traffic.py``): fresh draws, popular records with small edits shared by many
clients, own retries and edits, 64-row batches, bursts, slow drift; sessions overlap (about 32 at once)
and share the global index. Attacks (``bench/_matrix_attacks.py``, real ART code from
``guard_agent.attacks``): HopSkipJump, Boundary, HopSkipJump from a real sample of another class, a
persistent attacker opening a new key after each 403, a jittering attacker, HopSkipJump over 10 and 50
keys, uniform-noise extraction, JBDA, natural-data extraction (thief agreement with and without the guard).

The decisions are made **in-process** by the guard's own objects (``bench/_matrix_guard.py``: the state
``guard-agent run`` builds, the same trackers, ``decide()`` and policy), not over HTTP, so that the full run's
3,000 benign sessions per model take minutes; ``tests/test_detection_matrix.py`` checks over real HTTP that
the running guard decides the same for the same queries.

Printed per model and shape: benign sessions alerted (flag, harden, throttle or block) and blocked (403),
each with a one-sided 95 % Clopper-Pearson upper bound; per attack: runs stopped (every key refused),
queries to the first alert and block (median / worst), attack successes, thief agreement with and without
the guard. Targets: blocked benign <= 0.1 % and alerted <= 1 % (upper bounds), black-box attacks
blocked within 25 queries (50 from a natural start), synthetic extraction within 100, no success; a target
not met is printed as MISSED. Exit status 1 when any benign session was blocked.

Run:  python bench/detection_matrix.py --quick     (CI: a few minutes)
      python bench/detection_matrix.py             (3,000 benign sessions per model, 3 runs per attack)
      python bench/detection_matrix.py --models wine-rf digits-mlp --per-shape 100
      python bench/detection_matrix.py --quick --no-attacks --text   (with the text model's row)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _matrix_attacks import ATTACKS, AttackRun, run_attack
from _matrix_guard import InProcessGuard
from _matrix_models import MODELS, MatrixModel, fit_guard_profile, load_model
from _matrix_traffic import SHAPES, SessionResult, make_sessions, replay

BLOCK_TARGET = 0.001
ALERT_TARGET = 0.01


def upper95(k: int, n: int) -> float:
    """One-sided 95 % Clopper-Pearson upper bound of a rate seen k times in n."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(0.95, k + 1, n - k))


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} (<= {100 * upper95(k, n):.2g} %)"


def benign_rows(model: MatrixModel, results: list[SessionResult]) -> tuple[list[str], bool, bool]:
    """Table rows per shape and overall; (rows, blocked target met, alerted target met)."""
    out = []
    for shape in (*SHAPES, "all"):
        sel = [r for r in results if shape in ("all", r.shape)]
        n = len(sel)
        alerted = sum(r.alerted for r in sel)
        blocked = sum(r.blocked for r in sel)
        rules: dict[str, int] = {}
        for r in sel:
            for rule in r.rules:
                rules[rule] = rules.get(rule, 0) + 1
        signals: dict[str, int] = {}
        for r in sel:
            for sig in r.signals:
                signals[sig] = signals.get(sig, 0) + 1
        out.append(f"| {model.name} | {shape} | {n} | {_pct(alerted, n)} | {_pct(blocked, n)} | {_top(rules)} | "
                   f"{_top(signals)} |")
    n = len(results)
    ok_block = upper95(sum(r.blocked for r in results), n) <= BLOCK_TARGET
    ok_alert = upper95(sum(r.alerted for r in results), n) <= ALERT_TARGET
    return out, ok_block, ok_alert


def _top(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:3]) or "-"


def _med(values: list[int]) -> str:
    return f"{statistics.median(values):g} / {max(values)}" if values else "-"


def attack_row(model: MatrixModel, name: str, runs: list[AttackRun]) -> tuple[str, bool]:
    kind, keys, target = ATTACKS[name]
    blocks = [r.first_block for r in runs if r.first_block is not None]
    alerts = [r.first_alert for r in runs if r.first_alert is not None]
    successes = sum(r.success for r in runs)
    in_time = not target or (len(blocks) == len(runs) and max(blocks) <= target)
    met = successes == 0 and in_time
    agree = "-"
    if kind == "extraction":
        g = statistics.mean(r.fidelity or 0.0 for r in runs)
        u = statistics.mean(r.fidelity_unguarded or 0.0 for r in runs)
        agree = f"{g:.2f} / {u:.2f}"
    hardened = sum(r.hardened for r in runs)
    return (f"| {model.name} | {name} | {keys} | {sum(r.stopped for r in runs)}/{len(runs)} | {_med(alerts)} | "
            f"{_med(blocks)} | {successes}/{len(runs)} | {agree} | {hardened} | "
            f"{'ok' if met else 'MISSED'}{f' (<= {target})' if target else ''} |", met)


def text_rows(*, quick: bool, missed: list[str]) -> tuple[int, list[str]]:
    """The text model's row (``bench/_matrix_text.py``: TF-IDF + logistic regression behind the real guard over
    HTTP): benign sessions blocked, attack success with and without the guard, thief agreement."""
    from bench._matrix_text import text_row

    row = text_row(texts=5 if quick else 20, benign=30 if quick else 300, budget=150 if quick else 300)
    benign = row["benign"]
    blocked, sessions = benign["sessions_blocked"], benign["sessions"]
    if upper95(blocked, sessions) > BLOCK_TARGET:
        missed.append(f"text-fortunes: blocked benign sessions above {100 * BLOCK_TARGET:g} % (upper bound)")
    table = ["| model | benign sessions blocked (95 % upper bound) | word substitution success guarded / unguarded "
             "| character edits success guarded / unguarded | thief agreement guarded / unguarded |",
             "|---|---|---|---|---|",
             f"| text-fortunes | {_pct(blocked, sessions)} | {row['word']['success_with_guard']:.2f} / "
             f"{row['word']['success_without_guard']:.2f} | {row['char']['success_with_guard']:.2f} / "
             f"{row['char']['success_without_guard']:.2f} | {row['extraction_with_guard']['agreement']:.2f} / "
             f"{row['extraction_without_guard']['agreement']:.2f} |"]
    for name in ("word", "char"):
        if row[name]["success_with_guard"] > 0:
            missed.append(f"text-fortunes: {name} attack succeeded through the guard")
    return blocked, table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 sessions per shape, 1 run per attack, small budgets")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--per-shape", type=int, default=None, help="benign sessions per shape (full: 500)")
    ap.add_argument("--runs", type=int, default=None, help="runs per attack (full: 3)")
    ap.add_argument("--no-attacks", action="store_true")
    ap.add_argument("--text", action=argparse.BooleanOptionalAction, default=None,
                    help="the text row (real MLServer, bench/_matrix_text.py; default: on in the full run)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the thieves' convergence and scikit-learn's deprecation notices: noise here
    per_shape = args.per_shape or (10 if args.quick else 500)
    runs = args.runs or (1 if args.quick else 3)
    budget, queries = (400, 200) if args.quick else (1000, 300)

    benign_table = ["| model | shape | sessions | alerted (95 % upper bound) | blocked (95 % upper bound) | "
                    "rules (sessions) | session scores >= 0.5 besides risk (sessions) |",
                    "|---|---|---|---|---|---|---|"]
    attack_table = ["| model | attack | keys | stopped | first alert (median / worst) | first block (median / worst) "
                    "| successes | thief agreement guarded / unguarded | hardened answers | target |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
    missed: list[str] = []
    blocked_benign = 0
    with tempfile.TemporaryDirectory(prefix="detection-matrix-") as tmp:
        for name in args.models:
            t0 = time.process_time()
            model = load_model(name)
            profile, _ = fit_guard_profile(model, Path(tmp) / name)

            def make_guard(profile: Path = profile, model: MatrixModel = model) -> InProcessGuard:
                return InProcessGuard(str(profile), model.predict_proba)

            sessions = make_sessions(model.X_test, model.X_train, model.integer, per_shape, seed=12)
            guard = make_guard()
            results = replay(guard, sessions)
            guard.close()
            rows, ok_block, ok_alert = benign_rows(model, results)
            benign_table += rows
            blocked_benign += sum(r.blocked for r in results)
            if not ok_block:
                missed.append(f"{name}: blocked benign sessions above {100 * BLOCK_TARGET:g} % (upper bound)")
            if not ok_alert:
                missed.append(f"{name}: alerted benign sessions above {100 * ALERT_TARGET:g} % (upper bound)")
            print(f"<!-- {name}: {sum(len(s.requests) for s in sessions)} benign requests, "
                  f"{time.process_time() - t0:.0f} s CPU so far -->", flush=True)
            if args.no_attacks:
                continue
            correct = [i for i in range(len(model.X_test)) if model.clf.predict(model.X_test[i : i + 1])[0]
                       == model.y_test[i]]
            for attack in args.attacks:
                done: list[AttackRun] = []
                for r in range(runs):  # run r starts at the (7r)-th correctly answered row, never a row attacked before
                    start = (7 * r) % len(correct)
                    candidates = [c for c in correct[start:] + correct[:start] if c not in {d.row for d in done}]
                    done.append(run_attack(model, make_guard, attack, candidates, budget=budget,
                                           queries=600 if attack == "natural" and not args.quick else queries))
                row, met = attack_row(model, attack, done)
                attack_table.append(row)
                print(row, flush=True)
                if not met:
                    missed.append(f"{name}: {attack}")
            print(f"<!-- {name}: {time.process_time() - t0:.0f} s CPU -->", flush=True)
    if args.text if args.text is not None else not args.quick:
        blocked_text, text_table = text_rows(quick=args.quick, missed=missed)
        blocked_benign += blocked_text
        print("\n".join(text_table), flush=True)
    print()
    print("\n".join(benign_table))
    print()
    print("\n".join(attack_table))
    print()
    print("missed targets: " + ("; ".join(missed) if missed else "none"))
    return 1 if blocked_benign else 0


if __name__ == "__main__":
    sys.exit(main())
