"""Hostile input against the production stack (PostgreSQL, Redis, two web processes): text PostgreSQL
cannot store is refused with the embedded site's sentence, never a 500; login guesses spread over both
processes are counted once, in Redis, before any password is hashed."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import httpx

from harness.site import MEMBER
from tests.chat.hostile import assert_refused_alike, raw_json, unstorable_text_everywhere
from tests.production.conftest import ProductionSite

WRONG = {"detail": "Wrong username or password."}
_addresses = (f"127.250.{c}.{d}" for c in range(256) for d in range(1, 255))


def login_at(url: str, username: str, password: str) -> httpx.Response:
    """A login from an address of its own, as from another machine."""
    transport = httpx.HTTPTransport(local_address=next(_addresses))
    with httpx.Client(base_url=url, timeout=120, transport=transport) as client:
        return client.post("/api/auth/login", json={"username": username, "password": password})


async def test_text_postgresql_cannot_store_is_refused_with_a_sentence(production: ProductionSite) -> None:
    site = production.site
    with site.session(MEMBER) as client:
        answers = await unstorable_text_everywhere(site, client)
    with httpx.Client(base_url=site.url, timeout=60) as anonymous:
        logins = [
            raw_json(anonymous, "POST", "/api/auth/login", {"username": name, "password": password})
            for name, password in [("mem\x00ber", "x"), ("member", "pass\x00word"), ("\ud800", "x"), ("member", "\udfff")]
        ]
    assert_refused_alike(answers)
    assert [(r.status_code, r.json()) for r in logins] == [(400, WRONG)] * 4


def test_guesses_sent_at_once_to_two_web_processes_get_exactly_the_allowed_checks(production: ProductionSite) -> None:
    site = production.site
    site.manage("ensure_user", "crowded", "--password", "right-password-1")
    urls = itertools.cycle([site.url, production.other_url])
    guesses = [(next(urls), f"guess-{n}") for n in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda guess: login_at(guess[0], "crowded", guess[1]), guesses))
    right = [login_at(url, "crowded", "right-password-1") for url in (site.url, production.other_url)]
    assert sorted(r.status_code for r in answers) == [400] * 5 + [429] * 15
    assert [r.status_code for r in right] == [429, 429]
