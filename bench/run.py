"""`make bench`: every benchmark, each figure printed with its ratio to a baseline from the same run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import fleet_bench, gateway_bench, queue_bench, site_bench, sockets_bench, switch_bench, tabby_bench  # noqa: E402


def main() -> None:
    print("== Model server (tabby/) ==")
    tabby_bench.main()
    print()
    print("== Chat (site) ==")
    site_bench.main()
    print()
    print("== The OpenAI-compatible API (site) ==")
    gateway_bench.main()
    print()
    print("== Idle chat pages (site) ==")
    sockets_bench.main()
    print()
    print("== Model switching ==")
    switch_bench.main()
    print()
    print("== Held messages ==")
    queue_bench.main()
    print()
    print("== A fleet of two model servers ==")
    fleet_bench.main()


if __name__ == "__main__":
    main()
