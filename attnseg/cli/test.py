"""``attnseg-test CONFIG --checkpoint CKPT [--split test] [--out metrics.json]``: metrics table + JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnseg.cli.common import add_config_args, run_main


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per class with every per-class metric, then the means."""
    names = results.get("class_names") or []
    per_class = [k for k, v in results.items() if isinstance(v, list) and k != "class_names"]
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    lines = []
    if per_class and names:
        header = ["class", *per_class]
        lines.append("  ".join(f"{h:>12}" for h in header))
        for i, name in enumerate(names):
            row = [results[k][i] if i < len(results[k]) else math.nan for k in per_class]
            lines.append("  ".join([f"{name:>12}", *(f"{v:12.4f}" for v in row)]))
        lines.append("")
    for k, v in scalars.items():
        lines.append(f"{k:>16}: {v:.4f}")
    return "\n".join(lines)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="attnseg-test", description="Evaluate a checkpoint on a dataset split.")
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.ckpt) or model weights")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", default=None, help="metrics JSON path (default: <work_dir>/metrics_<split>.json)")
    args = parser.parse_args(argv)

    from attnseg.config import load_config
    from attnseg.engine.runner import evaluate, work_dir_for

    cfg = load_config(args.config, args.overrides)
    results = evaluate(cfg, args.checkpoint, split=args.split)
    print(format_table(results))
    out = Path(args.out) if args.out else work_dir_for(cfg) / f"metrics_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, allow_nan=True))
    print(f"metrics written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
