# A slim, non-root image for Fly.io, Railway or any container host.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RELAY_DATA_DIR=/data PORT=8000

WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install . && useradd --system --uid 10001 --home-dir /data --create-home relay

USER relay
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=4)"
CMD ["gunicorn", "-c", "python:relay.gunicorn_conf", "relay:create_app()"]
