# agentd: the daemon, the bundled Claude Code CLI and the bubblewrap sandbox.
#   docker build -t agentd .      (run it with deploy/compose.yaml, or see deploy/README.md)
#
# Base image pinned by version and by digest (the multi-platform index of python:3.11.15-slim-bookworm).
# The digest was taken from public repositories that pin this tag, NOT checked against Docker Hub (no
# registry access where this was written): check it with
#   docker buildx imagetools inspect python:3.11.15-slim-bookworm
FROM python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3

# bubblewrap + socat: the Claude Code sandbox that confines the agent's Bash. tini: PID 1.
# Pinned to their upstream release; Debian's security revisions of it still install.
RUN apt-get update \
 && apt-get install -y --no-install-recommends 'bubblewrap=0.8.0-*' 'socat=1.7.4.4-*' 'tini=0.19.0-*' \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 agentd \
 && useradd --no-log-init --create-home --uid 10001 --gid 10001 agentd \
 && install -d -o agentd -g agentd /var/lib/agentd

WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# The dependencies: exactly the lock that deploy/bootstrap.sh installs too (bash deploy/lock writes it),
# every file checked against its hash. Then agentd itself, without resolving anything again.
# Behind a TLS-intercepting proxy, pip needs the proxy's CA: give it as a build secret,
#   docker build --secret id=extra_ca,src=proxy-ca.pem -t agentd .
# deploy/pip-with-ca adds it to Debian's bundle for these two pip runs only; it is not kept in the image.
COPY deploy/requirements.lock deploy/pip-with-ca ./
RUN --mount=type=secret,id=extra_ca,required=false \
    sh pip-with-ca install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY bot ./bot
RUN --mount=type=secret,id=extra_ca,required=false \
    sh pip-with-ca install --no-cache-dir --no-deps . && rm pip-with-ca

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# No secrets here: ANTHROPIC_API_KEY, AGENTD_API_TOKEN, ... come from the environment at run time.
ENV AGENTD_STORE__DATA_DIR=/var/lib/agentd \
    AGENTD_HTTP__LISTEN=0.0.0.0:8080
VOLUME ["/var/lib/agentd"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)"]
# tini reaps any grandchild the CLI leaves behind and forwards SIGTERM to agentd.
ENTRYPOINT ["tini", "--", "agentd"]
CMD ["run"]
