# syntax=docker/dockerfile:1
# The curlfetch job service as a container image: a slim Debian (bookworm) Python 3.11, a
# virtual environment in /opt/curlfetch, a non-root user (10001), JSON logs on stdout and
# the data (SQLite database and bodies) on the /data volume.
#
#   docker build -t curlfetch .                 # or: podman build -t curlfetch .
#   docker run -d --name curlfetch -p 8080:8080 -v curlfetch-data:/data \
#          -e CURLFETCH_TOKENS="me:$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" \
#          curlfetch
#
# Configure it only through CURLFETCH_<OPTION> environment variables (`twistd curlfetch
# --help` lists the options); the HEALTHCHECK reads CURLFETCH_LISTEN too. The image listens
# on every interface (CURLFETCH_LISTEN=tcp:8080), so the service refuses to start without
# tokens: CURLFETCH_TOKENS, or CURLFETCH_TOKENS_FILE naming a mounted file.
#
# Building behind a TLS-intercepting proxy or against a private index: give pip what it needs
# as build secrets, which are mounted for one RUN only and never stored in a layer:
#   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt    (a CA bundle: PIP_CERT)
#   --secret id=pip_conf,src=$HOME/.config/pip/pip.conf            (a pip.conf: PIP_CONFIG_FILE)
# --build-arg PIP_INDEX_URL=... also works, but build arguments are recorded in the build
# stage's history: keep credentials in the pip_conf secret.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# `python3`, not `python`: Debian's own python3 has no `python` command.
RUN python3 -m venv /opt/curlfetch
WORKDIR /src
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
# Dependencies first, from pyproject.toml alone, so that a change to the code reuses this
# layer. The shell fragment turns the optional secrets and arguments into pip's settings.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert --mount=type=secret,id=pip_conf \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt; \
    /opt/curlfetch/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY service ./service
# Not editable: the curlfetch package and twisted/plugins/curlfetch_plugin.py (both under
# service/) go into site-packages, where twistd finds the plugin. `twistd --help` checks that, and writes Twisted's plugin
# cache (dropin.cache) now, while site-packages is still writable; `twistd curlfetch
# --help` imports the service itself.
RUN --mount=type=secret,id=pip_cert --mount=type=secret,id=pip_conf \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi; \
    /opt/curlfetch/bin/pip install --no-deps . ; \
    /opt/curlfetch/bin/twistd --help > /tmp/twistd-help; \
    grep -q '^ *curlfetch ' /tmp/twistd-help || { echo "twistd does not list curlfetch" >&2; exit 1; }; \
    /opt/curlfetch/bin/twistd curlfetch --help > /dev/null; \
    /opt/curlfetch/bin/python -c 'from curlfetch.engine import require_async_dns; require_async_dns()'

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="curlfetch" \
      org.opencontainers.image.description="HTTP fetch-job service: libcurl's multi interface on the Twisted reactor" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 curlfetch \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /data \
               --shell /usr/sbin/nologin curlfetch \
    && install -d -o 10001 -g 10001 -m 0750 /data
COPY --from=build /opt/curlfetch /opt/curlfetch
COPY --chmod=0755 deploy/container/healthcheck.py /usr/local/bin/curlfetch-healthcheck
ENV PATH=/opt/curlfetch/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CURLFETCH_LISTEN=tcp:8080 \
    CURLFETCH_DATA_DIR=/data \
    CURLFETCH_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 8080
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /data
# twistd drains on SIGTERM: /readyz answers 503, running transfers get
# CURLFETCH_DRAIN_TIMEOUT (20 s) to finish, the rest are requeued; then it exits 0. Give
# the container's stop timeout more than that (docker stop -t 30, podman stop -t 30).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["curlfetch-healthcheck"]
# An empty --pidfile= writes no pidfile, so a restarted container never finds a stale one.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "curlfetch"]
