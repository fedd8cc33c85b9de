"""Gantry's settings, all from environment variables (see `.env.example` and the README table).

With nothing set, Gantry runs embedded: SQLite, the in-memory channel layer, background work in the
web process. `DATABASE_URL` and `REDIS_URL` switch it to the production stack.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from gantry.env import env_bool, env_float, env_int, env_list, env_str

# The SECRET_KEY that .env.example ships with: a key everyone can read is no secret.
PLACEHOLDER_SECRET_KEYS = {"change-me-to-a-long-random-string"}


def secret_file(path: Path, make: Callable[[], str]) -> str:
    """The secret kept in `path`, made on first use: readable by this user only from the first byte
    (written under another name with mode 0600, then linked into place, so a process starting at the
    same moment reads either no file or the whole secret, never a half-written one)."""
    if not path.exists():
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(make())
            try:
                os.link(draft, path)
            except FileExistsError:
                pass  # another process made it first: theirs is the key
        finally:
            draft.unlink()
    return path.read_text().strip()


BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("GANTRY_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if SECRET_KEY.strip() in PLACEHOLDER_SECRET_KEYS:
    raise ImproperlyConfigured(
        "SECRET_KEY is still the placeholder of .env.example. Set it to a long random string, e.g. the output of "
        "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`."
    )
if not SECRET_KEY:
    if env_str("DATABASE_URL"):
        raise ImproperlyConfigured("SECRET_KEY must be set when DATABASE_URL is (production).")
    # Embedded default: one random key kept beside the SQLite database.
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    SECRET_KEY = secret_file(VAR_DIR / "secret_key", lambda: secrets.token_urlsafe(50))

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
# Origins whose pages may write and open sockets besides the site's own (Django's CSRF rules, for both).
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
# Behind a reverse proxy: take the scheme from X-Forwarded-Proto and the client's address from
# X-Forwarded-For (gantry/proxy.py). Never without it: a site no proxy fronts would believe anyone.
TRUST_PROXY_HEADERS = env_bool("TRUST_PROXY_HEADERS", False)
if TRUST_PROXY_HEADERS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "models_admin",
    "chat",
    "gateway",
]

# One stack for sync and async views: Django's own middleware, whose hooks run on the event loop for
# async views (gantry/middleware.py).
MIDDLEWARE = [
    "gantry.middleware.ProbesMiddleware",
    "gantry.middleware.SecurityMiddleware",
    "gantry.middleware.StaticFilesMiddleware",
    "gantry.middleware.SessionMiddleware",
    "gantry.middleware.CommonMiddleware",
    "gantry.middleware.CsrfViewMiddleware",
    "gantry.middleware.AuthenticationMiddleware",
    "gantry.middleware.MessageMiddleware",
    "gantry.middleware.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gantry.urls"
ASGI_APPLICATION = "gantry.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL")
# Seconds a thread keeps its database connection between requests (0: a new one for every request).
# Opening one costs more than a whole simple request; web threads are a bounded pool, so they are few.
DATABASE_CONN_MAX_AGE = env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0)
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=DATABASE_CONN_MAX_AGE, conn_health_checks=True)}
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / "gantry.sqlite3"),
            # Several threads write (web requests, background work): wait for the lock, don't fail.
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"},
            "CONN_MAX_AGE": DATABASE_CONN_MAX_AGE,
            "CONN_HEALTH_CHECKS": True,
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")
# A page's channel must hold the pieces of a whole answer while a busy process catches up: the in-memory
# layer silently drops what does not fit, and its default capacity (100 messages) is less than one answer.
CHANNEL_CAPACITY = 5000
CACHES: dict[str, dict[str, Any]]
if REDIS_URL:
    # Redis's publish/subscribe layer: one subscription per process, messages in the order they were
    # published. The sorted-set layer (channels_redis.core) loses a message now and then when other
    # sockets of the same process close while it waits for Redis (seen: 1 in 100 progress events with
    # pages opening and closing beside the one listening).
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL},
        "logins": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL},
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "gantry.layers.InMemoryChannelLayer", "CONFIG": {"capacity": CHANNEL_CAPACITY}}}
    CACHES = {
        # Roomy: each open socket holds an entry (its place, gantry/socket_slots.py), and the stock limit of
        # 300 entries would push the places of a thousand open pages out, each beat taking them anew.
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "OPTIONS": {"MAX_ENTRIES": 100_000}},
        # The login failure counters apart from sessions, and roomy (each entry is a fixed-size hash and a
        # number): guesses at many usernames must not push a locked account's count out of the cache.
        "logins": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "logins",
            "OPTIONS": {"MAX_ENTRIES": 100_000},
        },
    }

# Celery: a broker only in production; embedded, background work runs in the web process.
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Every password check, the Django admin's login included, counts failures per account and per address
# before it hashes (chat/accounts.py).
AUTHENTICATION_BACKENDS = ["chat.accounts.GuardedModelBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"
SESSION_COOKIE_NAME = "session_id"
# Sessions are kept in the database and read through the cache (Redis in production, shared by every
# process; the one web process's memory embedded): a request no longer pays a query for its session.
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise serves it; `collectstatic` fills it in production
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["gantry.parsers.JSONParser"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

# The TabbyAPI server. Keys come from TABBY_API_KEY / TABBY_ADMIN_KEY, else from TABBY_TOKENS_FILE
# (TabbyAPI's api_tokens.yml), which is how `make run` hands over the keys of its own server.
TABBY_HOST = env_str("TABBY_HOST", "http://127.0.0.1:5000").rstrip("/")
TABBY_API_KEY = env_str("TABBY_API_KEY")
TABBY_ADMIN_KEY = env_str("TABBY_ADMIN_KEY")
TABBY_TOKENS_FILE = env_str("TABBY_TOKENS_FILE")
TABBY_CONNECT_TIMEOUT = env_float("TABBY_CONNECT_TIMEOUT", 5.0, minimum=0.1)
TABBY_READ_TIMEOUT = env_float("TABBY_READ_TIMEOUT", 120.0, minimum=1.0)
# The longest wait for TabbyAPI in the model state's checks and refreshes, including those a page asks
# for (Refresh, a switch's check): a frozen model server never holds a page's thread longer.
TABBY_CHECK_TIMEOUT = env_float("TABBY_CHECK_TIMEOUT", 3.0, minimum=0.5)

GANTRY_MAX_MESSAGE_CHARS = env_int("GANTRY_MAX_MESSAGE_CHARS", 32_000, minimum=1)
GANTRY_MAX_ANSWER_TOKENS = env_int("GANTRY_MAX_ANSWER_TOKENS", 512, minimum=1)
GANTRY_MAX_CONCURRENT_GENERATIONS = env_int("GANTRY_MAX_CONCURRENT_GENERATIONS", 8, minimum=1)
# Threads serving pages and the chat API in each web process (see gantry/serving.py).
GANTRY_WEB_THREADS = env_int("GANTRY_WEB_THREADS", 2, minimum=1)
# Threads checking passwords in each web process, apart from the web threads: hashing a password takes a
# core for a good part of a second, and logins queued behind one another must not hold up pages.
GANTRY_LOGIN_THREADS = env_int("GANTRY_LOGIN_THREADS", 1, minimum=1)
GANTRY_MAX_QUEUED = env_int("GANTRY_MAX_QUEUED", 1000, minimum=1)
# One person's messages waiting for the model: no one account fills the queue for everyone.
GANTRY_MAX_QUEUED_PER_USER = env_int("GANTRY_MAX_QUEUED_PER_USER", 20, minimum=1)
# Seconds a request of the OpenAI-compatible API may wait in the queue before it is answered 503.
GANTRY_HOLD_TIMEOUT = env_float("GANTRY_HOLD_TIMEOUT", 300.0, minimum=1.0)
# Seconds a held request for a model no backend holds may wait because the loaded model still has requests
# to serve (the swap scheduler groups requests by model); past it, a backend is swapped for it anyway.
GANTRY_MAX_SWAP_WAIT = env_float("GANTRY_MAX_SWAP_WAIT", 30.0, minimum=0.0)
GANTRY_LOGIN_MAX_FAILURES = env_int("GANTRY_LOGIN_MAX_FAILURES", 5, minimum=1)
GANTRY_LOGIN_MAX_FAILURES_PER_ADDRESS = env_int("GANTRY_LOGIN_MAX_FAILURES_PER_ADDRESS", 20, minimum=1)
GANTRY_LOGIN_LOCKOUT = env_int("GANTRY_LOGIN_LOCKOUT", 300, minimum=1)
# Sockets (pages) a user may have open at once, counted across every web process.
GANTRY_MAX_SOCKETS_PER_USER = env_int("GANTRY_MAX_SOCKETS_PER_USER", 20, minimum=1)
# Seconds between an open socket's checks of its session and renewals of its place in that count; a
# place not renewed for three of them (its process died) is given back.
GANTRY_SOCKET_HEARTBEAT = env_float("GANTRY_SOCKET_HEARTBEAT", 30.0, minimum=0.5)
GANTRY_SWITCH_TIMEOUT = env_float("GANTRY_SWITCH_TIMEOUT", 30.0, minimum=1.0)
GANTRY_ROLLBACK_ON_FAILURE = env_bool("GANTRY_ROLLBACK_ON_FAILURE", True)
GANTRY_DRAIN_TIMEOUT = env_float("GANTRY_DRAIN_TIMEOUT", 60.0, minimum=0.0)
# A running switch or unload whose worker gave no sign of life for this long is declared dead.
GANTRY_OPERATION_STALE_AFTER = env_float("GANTRY_OPERATION_STALE_AFTER", 15.0, minimum=2.0)
GANTRY_REFRESH_INTERVAL = env_float("GANTRY_REFRESH_INTERVAL", 60.0, minimum=1.0)
CELERY_BEAT_SCHEDULE = {
    "refresh-models": {"task": "models_admin.tasks.refresh_models", "schedule": GANTRY_REFRESH_INTERVAL},
    # The fleet's health checks and reconciler (a round that finds nothing to do asks TabbyAPI nothing).
    "watch-fleet": {"task": "models_admin.fleet_tasks.watch_fleet", "schedule": 1.0, "options": {"expires": 1.0}},
}
CELERY_IMPORTS = ["models_admin.fleet_tasks", "models_admin.roll_tasks"]

# Operations (README, "Metrics and health"). The token lets Prometheus read /metrics (empty: only admin
# sessions can); Celery processes serve theirs on GANTRY_METRICS_PORT (0: not at all). With
# PROMETHEUS_MULTIPROC_DIR (an existing, empty directory), every process on the machine that shares it
# writes its figures there and any of them serves the sum (prometheus_client reads the variable itself).
GANTRY_METRICS_TOKEN = env_str("GANTRY_METRICS_TOKEN")
GANTRY_METRICS_PORT = env_int("GANTRY_METRICS_PORT", 0, minimum=0)
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "daphne": {"level": "WARNING"}},
}
