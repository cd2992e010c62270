"""The ``freshet`` command: ``freshet serve <service>`` and ``freshet demo``."""

from __future__ import annotations

import argparse
import asyncio
import os
import runpy
import sys
import time
from pathlib import Path

SERVICES = ("joiner", "trainer", "store", "publisher", "validator", "predictor")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="freshet", description="real-time online learning for recommendation")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one service until SIGTERM (configured by FRESHET_* variables)")
    serve.add_argument("service", choices=SERVICES)
    demo = sub.add_parser("demo", help="run the whole pipeline on synthetic traffic and print a summary")
    demo.add_argument("--seconds", type=float, default=float(os.environ.get("DEMO_SECONDS", 60)))
    demo.add_argument("--rate", type=float, default=40.0, help="synthetic requests per second (5 items each)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--workdir", type=Path, default=None, help="where logs and the NATS store go")
    args = parser.parse_args(argv)

    if args.command == "serve":
        sys.argv = [f"services.{args.service}"]
        runpy.run_module(f"services.{args.service}", run_name="__main__")
        return 0
    if args.seconds <= 0 or args.rate <= 0:
        parser.error("--seconds and --rate must be positive")
    from freshet.demo import run_demo

    workdir = args.workdir or Path(".demo") / time.strftime("%Y%m%d-%H%M%S")
    return asyncio.run(run_demo(args.seconds, args.rate, args.seed, workdir))


if __name__ == "__main__":
    raise SystemExit(main())
