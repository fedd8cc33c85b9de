# One image for every Gantry service: web (daphne), worker and beat (celery), and the model server.
# Build with `--build-arg EXTRAS=gpu` for the GPU model server (exllamav2 on CUDA torch).
FROM python:3.11-slim-bookworm

ARG EXTRAS=""
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gantry gantry
COPY models_admin models_admin
COPY chat chat
COPY tabby tabby
COPY templates templates
COPY static static
COPY manage.py ./

# The CPU build of torch unless the GPU extra is asked for (exllamav2 needs CUDA torch).
RUN if [ -z "$EXTRAS" ]; then pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX"; fi \
    && pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
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
