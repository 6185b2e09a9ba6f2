FROM python:3.11-slim-bookworm

# bubblewrap + socat: the Claude Code sandbox that confines the agent's tools.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap socat ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 agentd
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
RUN pip install --no-cache-dir .

USER agentd
ENV AGENTD_STORE__DATA_DIR=/var/lib/agentd \
    AGENTD_HTTP__LISTEN=0.0.0.0:8080
VOLUME ["/var/lib/agentd"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)" || exit 1
# tini reaps any grandchild the CLI leaves behind and forwards SIGTERM to agentd.
ENTRYPOINT ["tini", "--", "agentd"]
CMD ["run"]
