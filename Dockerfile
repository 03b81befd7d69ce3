# inference-guard: the guard sidecar image.
#
# Two stages: "build" turns the project and its dependencies into wheels and installs them into a
# virtualenv; "runtime" copies only that virtualenv onto a clean base, so no compiler, pip cache or
# source tree reaches the final image. It runs as the fixed non-root UID/GID 10001 (the Helm chart
# uses the same) and needs no writable path except /tmp, so a read-only root filesystem works.
#
# BASE_IMAGE must provide python3 (3.11+) with the venv module at the same path in both stages.
# The default needs a registry; scripts/build-image.sh passes a local debootstrap base instead.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# A CA bundle path for pip when the build runs behind a TLS-inspecting proxy (build-image.sh mounts
# the host's bundle read-only and sets this); empty means the base image's own bundle.
ARG PIP_CERT=""
ARG EXTRAS="redis"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guard_agent ./guard_agent
COPY detectors ./detectors
# Wheels first (the project and its dependencies), then an offline install from them: what is
# installed is exactly the set of wheels built here. Test suites shipped inside scipy/scikit-learn
# are dropped (tens of MB the guard never imports), then everything is byte-compiled once, so a
# read-only root filesystem costs nothing at start-up.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --no-cache-dir --wheel-dir /wheels ".[${EXTRAS}]" \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels "inference-guard[${EXTRAS}]" \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && find /opt/venv/lib -depth -type d -name tests -path "*/site-packages/*/tests" -exec rm -rf {} + \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
 && /opt/venv/bin/python -c "import guard_agent.app, detectors" \
 && /opt/venv/bin/guard-agent --version

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="inference-guard" \
      org.opencontainers.image.description="Runtime guard sidecar for ML model servers" \
      org.opencontainers.image.licenses="Apache-2.0"
# UID/GID 10001: fixed, non-root, outside the range of distribution users; the chart's
# securityContext pins the same numbers.
RUN groupadd --gid 10001 guard \
 && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init --home-dir /nonexistent \
      --shell /usr/sbin/nologin guard
COPY --from=build /opt/venv /opt/venv
# No GUARD_* variables here: the environment outranks the config file, so an image default would
# silently override what the chart's config.yaml says (listen ports 8080/9090 are the guard's own
# defaults anyway).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9090
# The admin port answers /livez without auth; python's urllib avoids shipping curl.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/livez', timeout=2)"]
ENTRYPOINT ["guard-agent"]
CMD ["run"]
