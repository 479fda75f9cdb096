# The edge federation gateway as a container. Production builds use the public
# Debian image; machines without a registry pass --build-arg BASE=<local image>
# (see deploy/README.md).
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
ARG PIP_INDEX_URL=
ARG PIP_CERT=
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge ./edge
RUN python3 -m venv /opt/edge \
 && PIP_INDEX_URL="${PIP_INDEX_URL}" PIP_CERT="${PIP_CERT}" \
    /opt/edge/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && /opt/edge/bin/edge --help >/dev/null

FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 edge \
 && useradd --system --uid 10001 --gid edge --home-dir /nonexistent --shell /usr/sbin/nologin edge
COPY --from=build /opt/edge /opt/edge
ENV PATH=/opt/edge/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGE_CONFIG=/etc/edge/edge.toml
USER 10001:10001
EXPOSE 5061 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["edge"]
CMD ["run", "--config", "/etc/edge/edge.toml"]
