# syntax=docker/dockerfile:1
#
# The watcher as a container image.
#
#   docker build -t magic-hour-watcher .
#   docker run -d --name watcher -v watcher-data:/data \
#     -e WATCHER_API_TOKEN_FILE=/run/secrets/magic_hour_token \
#     -e WATCHER_CONTROL_TOKEN=... magic-hour-watcher
#
# Two stages: the builder turns the source tree into a wheel; the runtime stage installs that
# wheel alone (and its dependencies from PyPI) on a clean slim base: no source tree, no tests and
# no build backend end up in the runtime image. See config/README.md for operating it.

# --------------------------------------------------------------------------------------------
# builder: the project's wheel, built with its own backend (hatchling) in an isolated env.
# --------------------------------------------------------------------------------------------
FROM python:3.12-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what the wheel is made of: metadata, the readme it embeds, the package.
COPY pyproject.toml README.md ./
COPY watcher/ ./watcher/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --------------------------------------------------------------------------------------------
# runtime: the installed wheel, a non-root user and one volume for all state.
# --------------------------------------------------------------------------------------------
FROM python:3.12-slim-bookworm AS runtime

# Keep in step with [project] version in pyproject.toml (tests/integration/test_packaging.py checks).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="magic-hour-watcher" \
      org.opencontainers.image.description="A daemon that tracks Magic Hour projects until they finish and saves every output before its URL expires." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12-slim-bookworm"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A fixed UID/GID so volume ownership is predictable and orchestrators can check runAsNonRoot.
RUN groupadd --system --gid 10001 watcher \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin watcher \
    && mkdir -p /data/downloads \
    && chown -R 10001:10001 /data

# The wheel is bind-mounted from the builder, so it never becomes a layer of this image.
RUN --mount=type=bind,from=builder,source=/dist,target=/tmp/dist \
    python -m pip install --no-cache-dir /tmp/dist/*.whl

# Everything the watcher keeps (its database and the downloaded outputs) lives under /data. The
# database URL is left to its default, sqlite:///./watcher.db, which the WORKDIR below puts in
# /data: setting it here would clash with a deployment's WATCHER_DATABASE_URL_FILE (config/).
ENV WATCHER_DOWNLOAD_DIR=/data/downloads \
    WATCHER_HTTP_HOST=0.0.0.0 \
    WATCHER_HTTP_PORT=8080
# Declared after the chown above so a new named volume starts out owned by the watcher user.
VOLUME /data
WORKDIR /data

USER 10001:10001
EXPOSE 8080

# `watcher health` asks /healthz where the daemon listens (WATCHER_HTTP_HOST and _PORT), and
# passes when the HTTP server is switched off (WATCHER_HTTP_ENABLED=false): nothing to ask then.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["watcher", "health"]

# The watcher drains in-flight downloads on SIGTERM for up to WATCHER_SHUTDOWN_GRACE seconds;
# give `docker stop` at least that long (docker stop --time 40, or stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["watcher"]
CMD ["run"]
