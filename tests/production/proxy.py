"""A real TLS reverse proxy for tests: Debian's nginx, running the repository's `deploy/nginx.conf.example` with a
self-signed certificate made for the test (openssl), in front of a site's daphne."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from harness.tabby_server import ROOT, free_port


@dataclass
class Proxy:
    url: str  # https://127.0.0.1:<port>
    certificate: Path  # the self-signed certificate, to trust it (or ignore_https_errors in a browser)
    log: Path

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certificate))


def self_signed_certificate(workdir: Path) -> tuple[Path, Path]:
    certificate, key = workdir / "proxy.pem", workdir / "proxy.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return certificate, key


def nginx_config(workdir: Path, port: int, upstream: str, certificate: Path, key: Path) -> str:
    """The shipped example with this test's address, certificate and upstream; every part replaced must be
    there, so the example cannot drift from what is tested."""
    site = (ROOT / "deploy" / "nginx.conf.example").read_text()
    for shipped, tested in {
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "server_name gantry.example.com;": "server_name 127.0.0.1;",
        "/etc/ssl/certs/gantry.example.com.pem": str(certificate),
        "/etc/ssl/private/gantry.example.com.key": str(key),
        "proxy_pass http://127.0.0.1:8000;": f"proxy_pass {upstream};",
    }.items():
        assert shipped in site, f"deploy/nginx.conf.example no longer has {shipped!r}"
        site = site.replace(shipped, tested)
    temp = "\n".join(f"  {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""  # as root, workers would run as nobody, locked out of workdir
    return (
        f"{user}worker_processes 1;\npid {workdir / 'nginx.pid'};\nerror_log {workdir / 'nginx-error.log'} warn;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n  access_log {workdir / 'nginx-access.log'};\n{temp}\n{site}\n}}\n"
    )


@contextmanager
def run_nginx(workdir: Path, upstream: str) -> Iterator[Proxy]:
    """nginx terminating TLS on a free port of 127.0.0.1, passing everything to `upstream` (http://...)."""
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if binary is None:
        pytest.fail("nginx is not installed; `make test` installs Debian's nginx package.")
    workdir.mkdir(parents=True, exist_ok=True)
    certificate, key = self_signed_certificate(workdir)
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(nginx_config(workdir, port, upstream, certificate, key))
    log = workdir / "nginx-error.log"
    with (workdir / "nginx.log").open("ab") as output:
        process = subprocess.Popen(
            [binary, "-p", str(workdir), "-e", str(log), "-c", str(config), "-g", "daemon off;"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    proxy = Proxy(f"https://127.0.0.1:{port}", certificate, log)
    try:
        wait_for_proxy(proxy, process)
        yield proxy
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for_proxy(proxy: Proxy, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"nginx exited with {process.returncode}:\n{proxy.log.read_text(errors='replace') if proxy.log.exists() else ''}"
            )
        try:
            if httpx.get(proxy.url + "/login/", verify=proxy.tls(), timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    pytest.fail(f"nginx did not answer {proxy.url} within {timeout:.0f} s.")
