# One image for every Gantry service: web (daphne), worker and beat (celery), and the model server.
#   docker build .                        the CPU image (slim Python, CPU torch): the site, and `tabby` on the CPU
#   docker build --build-arg EXTRAS=gpu . the GPU model server: CUDA torch and exllamav2 with its CUDA
#                                         extension compiled here, once (no load ever compiles it)
# The GPU build compiles for the GPU generations in TORCH_CUDA_ARCH_LIST (about half an hour on 8 cores;
# list only yours, e.g. "8.6", to make it quicker) and needs no GPU itself.

ARG EXTRAS=""
ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu24.04

# CPU: the image every service but the GPU model server runs.
FROM python:3.11-slim-bookworm AS base-cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
# The CPU build of torch, so that no multi-GB CUDA build is pulled.
RUN pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX"

# GPU, stage 1: exllamav2 built from its source with nvcc. The PyPI wheel carries no compiled
# extension and would compile it at its first import, inside the first load (minutes, and only
# where a CUDA toolkit matching torch's CUDA and ninja are installed).
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS exllamav2-build
ARG TORCH_VERSION=2.9.0
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG EXLLAMAV2_VERSION=0.3.2
ARG TORCH_CUDA_ARCH_LIST="7.5 8.0 8.6 8.9 9.0 10.0 12.0+PTX"
ARG MAX_JOBS=4
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
# torch's CUDA (cu128) must be the toolkit's (12.8): the extension links against both.
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url "$TORCH_CUDA_INDEX" \
    && pip install --no-cache-dir ninja setuptools wheel
# setup.py compiles the extension when torch is importable and EXLLAMA_NOCOMPILE is unset; the
# build must see this torch (no build isolation). Then prove the compiled module is installed.
RUN TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$MAX_JOBS" \
    pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels \
        "git+https://github.com/turboderp-org/exllamav2@v${EXLLAMAV2_VERSION}" \
    && pip install --no-cache-dir /wheels/exllamav2-*.whl \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('exllamav2_ext') is None)"

# GPU, stage 2: the CUDA runtime (no compiler) with the environment built above.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS base-gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 curl && rm -rf /var/lib/apt/lists/*
COPY --from=exllamav2-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The application, on either base.
FROM base-${EXTRAS:-cpu}
ARG EXTRAS
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gantry gantry
COPY models_admin models_admin
COPY chat chat
COPY gateway gateway
COPY tabby tabby
COPY templates templates
COPY static static
COPY manage.py ./

# On the GPU base, the `gpu` extra is already met by the exllamav2 built above, which pip keeps.
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && if [ -n "$EXTRAS" ]; then python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('exllamav2_ext') is None)"; fi \
    && DJANGO_SETTINGS_MODULE=gantry.settings SECRET_KEY=build STATIC_ROOT=/app/staticfiles GANTRY_VAR_DIR=/tmp/var \
       python manage.py collectstatic --noinput -v 0

# Run as a user of its own, not root. It owns only what it writes: var/, and the model server's keys in
# /data (compose's tabby-data volume, also mounted read-only at /tabby; a new volume takes the owner of
# the image's folder).
RUN useradd --system --create-home --uid 10001 --user-group gantry \
    && mkdir -p /app/var /data /tabby \
    && chown gantry:gantry /app/var /data /tabby
USER gantry

ENV STATIC_ROOT=/app/staticfiles GANTRY_VAR_DIR=/app/var
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "gantry.asgi:application"]
