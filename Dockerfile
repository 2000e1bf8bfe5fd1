# PromptPics on one NVIDIA GPU (docs/DEPLOY.md). Build: docker build -t promptpics .
# The base brings Python, CUDA and a torch built for it; pip keeps that torch (torch>=2.4).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PROMPTPICS_CONFIG=/app/config.toml \
    PROMPTPICS_DATA_DIR=/data \
    HF_HOME=/cache/huggingface

WORKDIR /app
COPY pyproject.toml README.md config.toml slack-manifest.yaml ./
COPY engine ./engine
COPY bot ./bot
RUN pip install --no-cache-dir . \
    && python -c "import engine, bot.cli"

# Never root: the bot reads chat input from strangers. The volumes are created owned by it.
RUN useradd --create-home --uid 10001 --user-group promptpics \
    && mkdir -p /data /cache/huggingface \
    && chown promptpics:promptpics /data /cache/huggingface
USER promptpics

# /data: the history database, images, the lock. /cache/huggingface: the weights (~100 GB).
VOLUME ["/data", "/cache/huggingface"]

# Weights present and complete, data folder writable, NudeNet present; no network, and no
# CUDA call (it would open a context on the card the running bot uses). About 2 s.
HEALTHCHECK --interval=5m --timeout=60s --start-period=2m --retries=3 \
    CMD ["promptpics", "doctor", "--offline", "--skip-gpu", "--json"]

ENTRYPOINT ["promptpics"]
CMD ["run"]
