"""``attnseg-train CONFIG [--set KEY=VALUE ...] [--print-config] [--resume] [--work-dir DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from attnseg.cli.common import add_config_args, run_main


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="attnseg-train", description="Train a model from a config file.")
    add_config_args(parser)
    parser.add_argument("--print-config", action="store_true", help="print the merged, validated config and exit")
    parser.add_argument("--resume", action="store_true", help="continue from <work_dir>/checkpoints/last.ckpt")
    parser.add_argument("--work-dir", default=None, help="output folder (overrides work_dir)")
    args = parser.parse_args(argv)

    from attnseg.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    from attnseg.engine.runner import train

    result = train(cfg, resume=args.resume, work_dir=args.work_dir)
    print(json.dumps(result, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
