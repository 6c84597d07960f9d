# The Turnout gateway: a slim, non-root image with the pinned packages and the embedder baked in.
#   docker build -t turnout:0.1.0 .
#   docker run -p 8080:8080 -v "$PWD/deploy/configs:/etc/turnout:ro" \
#     -e TURNOUT_CONFIG=/etc/turnout/compose.yaml turnout:0.1.0
# Nothing is fetched at run time: the MiniLM ONNX model ships in a pinned package, and the static embedder's
# table is distilled from it here, at build time. The training stack (`turnout[train]`: scikit-learn, pandas,
# pyarrow, matplotlib) stays out: the gateway serves artifacts trained elsewhere with `turnout train`.

FROM python:3.11.7-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 TURNOUT_CACHE=/opt/turnout-cache
WORKDIR /src
RUN python -m venv /opt/turnout
COPY pyproject.toml README.md ./
COPY server ./server
COPY routers ./routers
RUN /opt/turnout/bin/pip install --no-cache-dir . \
    && /opt/turnout/bin/python -c "from routers.embedding.cache import model_cache_dir; \
from routers.embedding.static import load_or_distil; load_or_distil(model_cache_dir())"

FROM python:3.11.7-slim-bookworm
ENV PATH=/opt/turnout/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TURNOUT_CACHE=/opt/turnout-cache TURNOUT_CONFIG=/etc/turnout/config.yaml
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin turnout
COPY --from=build /opt/turnout /opt/turnout
COPY --from=build --chown=10001:10001 /opt/turnout-cache /opt/turnout-cache
USER 10001
EXPOSE 8080
# Liveness of the process; whether workers can be reached is /readyz (the orchestrator's readiness probe).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["turnout", "serve", "--host", "0.0.0.0", "--port", "8080"]
