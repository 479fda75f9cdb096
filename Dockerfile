# The edge federation gateway as a container (deploy/README.md says how to build
# and run it). Production builds use the public Debian image; machines without a
# registry pass --build-arg BASE=<the same distribution made locally>.
#
# Runtime contract:
#   user        10001:10001, no shell, no home; the process needs no capability
#               (ports 5061 and 9464 are above 1024)
#   read-only   works with a read-only root filesystem and no tmpfs at all: the
#               gateway writes only to stdout (JSON log lines); bytecode is
#               compiled at build time
#   /etc/edge   mounted read-only: edge.toml, the certificates it names and
#               federation_policies/ (watched for new partners)
#   ports       5061 partners (mtls), 9464 /metrics /healthz /readyz
#   SIGTERM     stop accepting, drain for [limits] drain_timeout_s, exit 0
ARG BASE=debian:bookworm-slim

# --- build: Debian's Python 3.11, a wheel of the project, a venv with it -------
FROM ${BASE} AS build
ARG PIP_INDEX_URL=
ARG PIP_CERT=
# DL3008 (pin apt versions) is ignored on purpose: the base tag pins the Debian
# release, and exact versions vanish from the archive at each point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge ./edge
# A wheel first (what a release would publish), then that wheel and its
# dependencies into /opt/edge. pip and setuptools leave the venv afterwards: the
# runtime never installs anything. PIP_CERT / PIP_INDEX_URL, when given, let a
# build behind a TLS-intercepting proxy or a mirror reach the package index.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps \
      --wheel-dir /wheels . \
 && python3 -m venv /opt/edge \
 && /opt/edge/bin/pip install --no-cache-dir --disable-pip-version-check --compile /wheels/*.whl \
 && /opt/edge/bin/pip uninstall --yes --disable-pip-version-check pip setuptools \
 && /opt/edge/bin/edge --help >/dev/null
COPY deploy/image/healthcheck.py /opt/edge/libexec/healthcheck.py
RUN /opt/edge/bin/python -m compileall -q /opt/edge/libexec

# --- runtime: python3 and the venv; no compiler, no pip, no package caches ------
FROM ${BASE}
LABEL org.opencontainers.image.title="edge" \
      org.opencontainers.image.description="DMZ edge federation gateway: per-partner mutual TLS in, mutual TLS to an internal pool" \
      org.opencontainers.image.licenses="Apache-2.0"
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
      /usr/share/doc/* /usr/share/man/* \
 && groupadd --system --gid 10001 edge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin edge \
 && mkdir -p /etc/edge/certs /etc/edge/federation_policies
COPY --from=build /opt/edge /opt/edge
ENV PATH=/opt/edge/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGE_CONFIG=/etc/edge/edge.toml
WORKDIR /etc/edge
USER 10001:10001
EXPOSE 5061 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/opt/edge/bin/python", "/opt/edge/libexec/healthcheck.py"]
ENTRYPOINT ["edge"]
CMD ["run", "--config", "/etc/edge/edge.toml"]
