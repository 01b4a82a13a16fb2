# syntax=docker/dockerfile:1
# harvester's image: the daemon (`harvester run`) as a non-root user.
#
#   make image                      (Docker or buildah; see configs/image.sh)
#   docker build -t harvester .     (with a Docker engine and the registry's base image)
#   docker run --rm -p 8080:8080 -v harvester-data:/var/lib/harvester \
#       -v "$PWD/config.toml:/etc/harvester/config.toml:ro" -e PLAYMENT_API_KEY harvester
#
# Two stages: the builder turns the source into wheels (harvester's and its dependencies'),
# the runtime installs them from that folder alone. The runtime stage never sees the source,
# a compiler or the dev extras (pytest, mypy, ruff), and installs nothing from the network.
# Every dependency is pinned by constraints.txt (`make lock`), so a rebuild gets the same
# versions.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY harvester ./harvester
# The postgres extra (asyncpg) too: the same image serves sqlite and Postgres stores; and the
# s3 extra (boto3), which aborts the multipart uploads a killed replica left in an s3:// output.
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt ".[postgres,s3]"

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/harvester-dev/harvester
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="harvester" \
      org.opencontainers.image.description="Submit, track and harvest jobs from remote annotation/ML providers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HARVESTER_CONFIG=/etc/harvester/config.toml
# The wheels are bind-mounted, not copied, so they never become a layer of this image.
# uid/gid 10001: numeric, so Kubernetes' runAsNonRoot can verify it, and above the range a
# host's own users get, so files on a shared volume never belong to someone real.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "harvester[postgres,s3]" \
    && groupadd --gid 10001 harvester \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/harvester \
        --no-create-home --shell /usr/sbin/nologin harvester \
    && mkdir -p /etc/harvester /var/lib/harvester \
    && chown 10001:10001 /var/lib/harvester

# The store (sqlite) and the harvested output live here; the config's store.url and
# output.dir must point inside it (see configs/k8s/configmap.yaml).
VOLUME /var/lib/harvester
WORKDIR /var/lib/harvester
USER 10001:10001
EXPOSE 8080

# slim has no curl; Python's urllib does the same job. Kubernetes ignores HEALTHCHECK and
# uses the Deployment's probes instead. urlopen raises on a non-2xx answer, so any failure
# exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HARVESTER_HEALTH_URL', 'http://127.0.0.1:8080/healthz'), timeout=4)"]

# SIGTERM (docker stop, Kubernetes) drains in-flight work for server.drain_grace_s; give
# `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["harvester"]
CMD ["run", "-c", "/etc/harvester/config.toml"]
