"""`python -m tabby.demo [TARGET_DIR] [NAME ...]`, as when the demo maker was a single module."""

from __future__ import annotations

import sys

from tabby.demo.writing import main

if __name__ == "__main__":
    main(sys.argv[1:])
