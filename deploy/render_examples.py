"""Render the deployment examples from the Helm chart, so they never drift from it.

    python deploy/render_examples.py [--helm PATH] [--out DIR]

- deploy/kserve/inference-guard.yaml: the InferenceService (raw deployment mode) and the guard's
  ConfigMaps, NetworkPolicy, admin Service, PrometheusRule and dashboard, from deploy/kserve/values.yaml.
- deploy/kustomize/guard/guard.yaml and guard/patch.yaml: the guard's objects and the strategic-merge
  patches that add it to your Deployment and Service, from deploy/kustomize/values.yaml.

Both are `helm template` output of the chart's partials (the chart's own Deployment uses the same
ones). tests/ops/test_examples.py renders again and fails when a committed file differs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "inference-guard"
RELEASE, NAMESPACE = "digits", "models"
HEADER = "# Rendered by deploy/render_examples.py from helm/inference-guard and {values}: do not edit.\n"
PATCH_SOURCE = "# Source: inference-guard/templates/injection-patch.yaml"


def helm_template(helm: str, values: Path) -> str:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(values)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"helm template failed for {values}:\n{proc.stderr}")
    return proc.stdout


def split_documents(text: str) -> list[str]:
    """``helm template`` output as documents, each starting with its ``# Source:`` line."""
    docs = (doc.strip().removeprefix("---").strip() for doc in ("\n" + text).split("\n---\n"))
    return [doc + "\n" for doc in docs if doc]


def render(helm: str, out: Path) -> list[Path]:
    """Write the examples under ``out`` (the repository root for the committed copies)."""
    written: list[Path] = []
    kserve_values = ROOT / "deploy" / "kserve" / "values.yaml"
    docs = split_documents(helm_template(helm, kserve_values))
    target = out / "deploy" / "kserve" / "inference-guard.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(HEADER.format(values="deploy/kserve/values.yaml") + "---\n" + "---\n".join(docs))
    written.append(target)

    kustomize_values = ROOT / "deploy" / "kustomize" / "values.yaml"
    docs = split_documents(helm_template(helm, kustomize_values))
    patches = [d for d in docs if d.startswith(PATCH_SOURCE)]
    objects = [d for d in docs if d not in patches]
    guard_dir = out / "deploy" / "kustomize" / "guard"
    guard_dir.mkdir(parents=True, exist_ok=True)
    header = HEADER.format(values="deploy/kustomize/values.yaml")
    for name, part in (("guard.yaml", objects), ("patch.yaml", patches)):
        (guard_dir / name).write_text(header + "---\n" + "---\n".join(part))
        written.append(guard_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--helm", default=shutil.which("helm") or str(Path(sys.executable).parent / "helm"))
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write deploy/... under (default: the repo)")
    args = parser.parse_args(argv)
    for path in render(args.helm, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
