"""The ``freshet`` command: ``freshet serve <service>``, ``freshet demo`` and ``freshet replay <format> <path>``."""

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
    _add_replay_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "serve":
        sys.argv = [f"services.{args.service}"]
        runpy.run_module(f"services.{args.service}", run_name="__main__")
        return 0
    if args.command == "replay":
        return _replay(parser, args)
    if args.seconds <= 0 or args.rate <= 0:
        parser.error("--seconds and --rate must be positive")
    from freshet.demo import run_demo

    workdir = args.workdir or Path(".demo") / time.strftime("%Y%m%d-%H%M%S")
    return asyncio.run(run_demo(args.seconds, args.rate, args.seed, workdir))


def _add_replay_parser(sub) -> None:
    from freshet.datasets import FORMATS
    from freshet.replay import DEFAULT_MAX_GAP_S

    formats = "\n".join(f"  {name:11s} {spec.summary}" for name, spec in FORMATS.items())
    replay = sub.add_parser(
        "replay",
        help="publish a public dataset as impression and click events on events.columns.<p>",
        description=f"formats:\n{formats}\n\nEvents keep the dataset's event times unless --shift-to-now.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("format", choices=sorted(FORMATS))
    replay.add_argument("path", type=Path, help="the dataset file (.gz read compressed) or its directory")
    replay.add_argument(
        "--speedup", type=float, default=None, help="event time / wall time; default: as fast as possible"
    )
    replay.add_argument("--limit", type=int, default=None, help="read at most N data rows of the file")
    replay.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="event partitions (default: FRESHET_PARTITIONS, else 1)",
    )
    replay.add_argument("--nats-url", default=None, help="default: FRESHET_NATS_URL, else nats://127.0.0.1:4222")
    replay.add_argument(
        "--name", default=None, help="message id prefix (default: replay-<format>-<unix ms>, unique)"
    )
    replay.add_argument("--shift-to-now", action="store_true", help="shift all event times so the first is now")
    replay.add_argument(
        "--max-gap-s",
        type=float,
        default=DEFAULT_MAX_GAP_S,
        help=f"longest single pacing wait in wall seconds (default {DEFAULT_MAX_GAP_S:g})",
    )


def _replay(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nats.errors import Error as NatsError

    from freshet.config import BusConfig, ConfigError, from_env
    from freshet.datasets import DatasetError
    from freshet.replay import replay_file

    if args.speedup is not None and not args.speedup > 0:
        parser.error("--speedup must be positive")
    if not args.max_gap_s > 0:
        parser.error("--max-gap-s must be positive")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    partitions = args.partitions
    if partitions is None:
        raw = os.environ.get("FRESHET_PARTITIONS", "1")
        if not raw.strip().isdigit():
            parser.error(f"FRESHET_PARTITIONS={raw!r} is not a positive integer")
        partitions = int(raw)
    if partitions <= 0:
        parser.error("--partitions must be positive")
    try:
        overrides = {"nats_url": args.nats_url} if args.nats_url else {}
        bus_config = from_env(BusConfig, **overrides)
        stats = asyncio.run(
            replay_file(
                args.format,
                args.path,
                bus_config=bus_config,
                partitions=partitions,
                speedup=args.speedup,
                name=args.name,
                limit=args.limit,
                max_gap_s=args.max_gap_s,
                shift_to_now=args.shift_to_now,
            )
        )
    except (DatasetError, ConfigError) as exc:
        print(f"freshet replay: {exc}", file=sys.stderr)
        return 2
    except (OSError, NatsError) as exc:  # the file was checked before connecting: this is NATS
        print(f"freshet replay: cannot publish to NATS at {bus_config.nats_url}: {exc!r}", file=sys.stderr)
        return 1
    print(f"replayed {args.format} {args.path}: {stats.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
