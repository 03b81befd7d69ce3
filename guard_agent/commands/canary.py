"""``guard-agent canary record|check``: record canary queries against the approved model, or replay them.

``record`` sends reference rows to the model, picks canaries (class prototypes, rows near the decision
boundary, a random sample; see ``guard_agent.integrity._select``), asks the model about them twice (answers
that are not repeatable would raise false alarms), fetches its metadata and writes the canary set.
``check`` replays a canary path against a model server, exactly as the running guard does: use it to prove
a new set matches a new model before rolling them out.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI builds every subcommand's parser: keep importing this module cheap
    import aiohttp
    import numpy as np

    from guard_agent.integrity._upstream import Answer

from guard_agent.commands._convention import FAILED, OK, CommandError, add_json_argument, print_json

__all__ = ["add_arguments", "run"]

_AUTO_OUTPUTS = ("predict", "predict_proba")
BATCH = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="canary_command", required=True)
    r = sub.add_parser("record", help="record canaries (inputs + the approved model's answers)")
    r.add_argument("--upstream", required=True, help="URL of the model server running the approved model")
    r.add_argument("--model", required=True, help="model name on that server")
    r.add_argument("--data", required=True, help="reference data, .npy (2-D) or numeric .csv")
    r.add_argument("--out", required=True, help="directory to write canaries.json and canaries.npz into")
    r.add_argument("--label-column", dest="label_column", help="CSV column to drop (labels are not inputs)")
    r.add_argument("--count", type=int, default=48, help="number of canaries (default 48)")
    r.add_argument("--pool", type=int, default=2048, help="reference rows to ask the model about (default 2048)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted absolute probability difference (default 1e-3)")
    r.add_argument("--protocol", choices=("v2", "v1"), default="v2", help="inference protocol (default v2)")
    r.add_argument("--input-name", dest="input_name", default="input-0", help="v2 input tensor name")
    r.add_argument("--datatype", default="FP64", help="v2 input datatype (default FP64)")
    r.add_argument("--outputs", default=None,
                   help="comma-separated v2 output names to request; default: predict,predict_proba when the "
                        "server accepts them (MLServer scikit-learn), else the server's default outputs")
    r.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    r.add_argument("--force", action="store_true", help="replace an existing canary set")
    c = sub.add_parser("check", help="replay canaries against a model server; exit 1 on a mismatch")
    c.add_argument("--upstream", required=True, help="URL of the model server")
    c.add_argument("--canaries", required=True, help="a canary set directory, or a directory of sets")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    add_json_argument(c, "one result per canary set")


def run(args: argparse.Namespace) -> int:
    from guard_agent.integrity._canaries import CanaryError
    from guard_agent.integrity._upstream import UpstreamError

    try:
        if args.canary_command == "record":
            return asyncio.run(_record(args))
        return asyncio.run(_check(args))
    except (CanaryError, UpstreamError, ValueError) as exc:
        raise CommandError(str(exc)) from exc


async def _ask(client: aiohttp.ClientSession, args: argparse.Namespace, X: np.ndarray,
               outputs: tuple[str, ...]) -> Answer:
    import numpy as np

    from guard_agent.integrity._upstream import Answer, UpstreamError, infer

    labels: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    for start in range(0, X.shape[0], BATCH):
        answer = await infer(client, args.upstream, args.model, X[start:start + BATCH], protocol=args.protocol,
                             input_name=args.input_name, datatype=args.datatype, outputs=outputs,
                             timeout=args.timeout)
        if not answer.readable or (answer.labels is None and answer.probabilities is None):
            raise UpstreamError("the model's answer has neither labels nor class probabilities")
        if answer.labels is not None:
            labels.append(answer.labels)
        if answer.probabilities is not None:
            probs.append(answer.probabilities)
    chunks = -(-X.shape[0] // BATCH)
    return Answer(np.concatenate(labels) if len(labels) == chunks else None,
                  np.concatenate(probs) if len(probs) == chunks else None, readable=True)


async def _pick_outputs(client: aiohttp.ClientSession, args: argparse.Namespace, probe: np.ndarray
                        ) -> tuple[str, ...]:
    from guard_agent.integrity._upstream import UpstreamError

    if args.outputs is not None:
        return tuple(o.strip() for o in args.outputs.split(",") if o.strip())
    if args.protocol != "v2":
        return ()
    try:
        await _ask(client, args, probe, _AUTO_OUTPUTS)
    except UpstreamError as exc:
        if "HTTP 4" not in str(exc):
            raise
        return ()
    return _AUTO_OUTPUTS


async def _record(args: argparse.Namespace) -> int:
    import aiohttp
    import numpy as np

    from detectors import load_reference
    from guard_agent.integrity._canaries import CanarySet, save_canaries
    from guard_agent.integrity._compare import compare_answers
    from guard_agent.integrity._select import select_canaries
    from guard_agent.integrity._upstream import fetch_metadata

    if args.count < 1 or args.pool < 1 or not args.tolerance >= 0:
        raise ValueError("--count and --pool must be positive, --tolerance >= 0")
    X, _, _ = load_reference(args.data, label_column=args.label_column)
    rng = np.random.default_rng(args.seed)
    pool = X[np.sort(rng.choice(X.shape[0], size=min(X.shape[0], args.pool), replace=False))]
    async with aiohttp.ClientSession() as client:
        outputs = await _pick_outputs(client, args, pool[:1])
        answer = await _ask(client, args, pool, outputs)
        selection = select_canaries(pool, answer.labels, answer.probabilities, count=args.count, rng=rng,
                                    min_margin=max(2 * args.tolerance, 1e-9))
        if selection.indices.size == 0:
            raise ValueError("no reference row has a clear enough answer to serve as a canary")
        chosen = pool[selection.indices]
        first = await _ask(client, args, chosen, outputs)
        second = await _ask(client, args, chosen, outputs)
        metadata = await fetch_metadata(client, args.upstream, args.model, protocol=args.protocol,
                                        timeout=args.timeout)
    draft = CanarySet(model=args.model, inputs=chosen, labels=first.labels, probabilities=first.probabilities,
                      kinds=selection.kinds, protocol=args.protocol, input_name=args.input_name,
                      datatype=args.datatype, outputs=outputs, probability_atol=args.tolerance)
    repeat = compare_answers(draft, second.labels, second.probabilities)
    if repeat.differed:
        raise ValueError(f"the model answered {repeat.differed} canaries differently when asked twice "
                         f"(largest probability difference {repeat.max_probability_diff:.3g}): its answers are "
                         "not repeatable within --tolerance")
    final = CanarySet(model=draft.model, inputs=draft.inputs, labels=draft.labels,
                      probabilities=draft.probabilities, kinds=draft.kinds, protocol=draft.protocol,
                      input_name=draft.input_name, datatype=draft.datatype, outputs=draft.outputs,
                      probability_atol=draft.probability_atol, metadata=metadata,
                      recorded_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
    revision = save_canaries(final, args.out, force=args.force)
    counts = {k: selection.kinds.count(k) for k in ("prototype", "boundary", "sample")}
    classes = "-" if final.probabilities is None else str(final.probabilities.shape[1])
    print(f"recorded {final.count} canaries for model {args.model!r} into {args.out}: "
          f"{counts['prototype']} class prototypes, {counts['boundary']} near the decision boundary, "
          f"{counts['sample']} sampled")
    print(f"  answers: labels={'yes' if final.labels is not None else 'no'}, probabilities over {classes} classes, "
          f"tolerance {args.tolerance:g}; outputs requested: {','.join(outputs) or '(server default)'}")
    print(f"  metadata: {_short(metadata)}")
    print(f"  revision {revision}")
    return OK


def _short(metadata: dict[str, Any] | Any) -> str:
    if not isinstance(metadata, dict):
        return "not available (metadata changes will not be checked)"
    return ", ".join(f"{k}={metadata[k]!r}" for k in sorted(metadata))[:300]


async def _check(args: argparse.Namespace) -> int:
    import aiohttp

    from guard_agent.integrity._canaries import group_by_model, load_canary_dir
    from guard_agent.integrity._compare import compare_answers, metadata_changes
    from guard_agent.integrity._upstream import fetch_metadata, infer

    sets = load_canary_dir(args.canaries)
    failed = False
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as client:
        for model, model_sets in group_by_model(sets).items():
            passing = False
            for cs in model_sets:
                answer = await infer(client, args.upstream, model, cs.inputs, protocol=cs.protocol,
                                     input_name=cs.input_name, datatype=cs.datatype, outputs=cs.outputs,
                                     timeout=args.timeout)
                result = compare_answers(cs, answer.labels, answer.probabilities)
                metadata = (await fetch_metadata(client, args.upstream, model, protocol=cs.protocol,
                                                 timeout=args.timeout) if cs.metadata is not None else None)
                changed = metadata_changes(cs.metadata, metadata)
                ok = result.ok and not changed
                passing = passing or ok
                detail = (f"{result.differed}/{result.checked} canaries differ "
                          f"({result.label_mismatches} labels, max probability diff "
                          f"{result.max_probability_diff:.3g})")
                if result.reason:
                    detail += f"; {result.reason}"
                if changed:
                    detail += f"; metadata changed: {', '.join(changed)}"
                results.append({"model": model, "revision": cs.revision, "source": str(cs.source), "ok": ok,
                                "checked": result.checked, "differed": result.differed,
                                "label_mismatches": result.label_mismatches,
                                "max_probability_diff": result.max_probability_diff, "reason": result.reason,
                                "metadata_changed": list(changed)})
                if not args.json:
                    print(f"{'ok  ' if ok else 'FAIL'} {model} set {cs.revision[:12]} ({cs.source}): {detail}")
            failed = failed or not passing
    if args.json:
        print_json(results)
    return FAILED if failed else OK
