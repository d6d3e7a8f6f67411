# The companion's one image: `companion worker` (the default command) or `companion gateway`, and every other
# `companion` command. Multi-stage: uv builds the virtual environment from uv.lock, the runtime stage copies it.

FROM python:3.11-slim-bookworm AS build
COPY --from=ghcr.io/astral-sh/uv:0.13 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
# Dependencies first, so a code change reuses this layer.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY core core
COPY clients clients
COPY schemas schemas
COPY storage storage
COPY activities activities
COPY workflows workflows
COPY cli cli
COPY worker.py bot_gateway.py ./
COPY temporal-config temporal-config
RUN uv sync --frozen --no-dev

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 companion
WORKDIR /app
COPY --from=build --chown=companion:companion /app /app
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1 ENVIRONMENT=production COMPANION_DATA_DIR=/home/companion/data
USER companion
ENTRYPOINT ["companion"]
CMD ["worker"]
