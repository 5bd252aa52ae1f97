# pruneaudit: one image for the API, the workers and the migration job (compose picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and from the CPU index: an unpinned torch from PyPI pulls a multi-GB CUDA build. This
# layer changes only when the pin does, so code changes do not download it again. GPU workers build with a
# CUDA index and version (docker-compose.yml's gpu-worker).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX_URL}

WORKDIR /app
# README.md* so the build does not break while the README is absent (setuptools only warns then).
COPY pyproject.toml README.md* LICENSE ./
COPY arch ./arch
COPY results ./results
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install . \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

# Non-root at run time; the blob store and the embedded-defaults directory belong to that user (a
# named volume mounted on /data/blobs starts with this ownership).
RUN useradd --system --uid 10001 --create-home --home-dir /home/pruneaudit pruneaudit \
    && mkdir -p /data/blobs /var/lib/pruneaudit \
    && chown -R pruneaudit:pruneaudit /data /var/lib/pruneaudit
USER pruneaudit
WORKDIR /home/pruneaudit

ENV PRUNEAUDIT_BLOB_DIR=/data/blobs \
    PRUNEAUDIT_VAR_DIR=/var/lib/pruneaudit \
    PRUNEAUDIT_HOST=0.0.0.0 \
    PRUNEAUDIT_PORT=8000

EXPOSE 8000
CMD ["pruneaudit", "api"]
