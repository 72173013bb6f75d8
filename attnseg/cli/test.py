"""``attnseg-test CONFIG --checkpoint CKPT [--split test] [--out-dir DIR]``: evaluate a checkpoint on a split.

Prints the per-class table and the means, and writes to ``--out-dir`` (default: the run's work dir):

- ``metrics_<split>.json``: everything (per-class lists, means, the per-case rows under ``cases``);
- ``cases_<split>.csv``: one row per case (Dice, HD95 and surface Dice per class, and their means);
- ``report_<split>.md``: the per-class summary (mean, std, median over cases) and the per-case table;
- ``boxplot_<split>.png``: per-class box plots of Dice, HD95 and surface Dice over the cases.

HD95 and surface Dice are in mm for datasets whose samples carry a voxel spacing (3D NIfTI), else in pixels.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attnseg.cli.common import add_config_args, run_main


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table: one row per class with every per-class metric, then the means."""
    names = results.get("class_names") or []
    per_class = [k for k, v in results.items() if isinstance(v, list) and k not in ("class_names", "cases")]
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


def write_cases_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The per-case rows as CSV (columns: ``case``, then every metric column in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _stats(values: Sequence[float]) -> tuple[float, float, float, int]:
    """(mean, std, median, count) of the non-NaN values."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan, math.nan, 0
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
    s = sorted(v)
    mid = len(s) // 2
    return mean, std, (s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2), len(v)


def format_markdown(results: Mapping[str, Any], title: str) -> str:
    """A Markdown report: means, the per-class summary over cases (mean ± std, median, n) and the per-case table."""
    rows = results.get("cases") or []
    names = results.get("class_names") or []
    metrics = [m for m in ("Dice", "HD95", "NSD") if rows and any(k.startswith(m + "_") for k in rows[0])]
    lines = [f"# {title}", ""]
    means = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    if means:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in means.items()), ""]
    if metrics:
        lines += ["Per class over the cases (mean ± std, median, cases where defined):", "",
                  "| class | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for name in names:
            cells = []
            for m in metrics:
                key = f"{m}_{name}"
                if not any(key in r for r in rows):
                    break
                mean, std, med, n = _stats([r[key] for r in rows if key in r])
                cells.append(f"{mean:.4f} ± {std:.4f}, {med:.4f} ({n})" if n else "n/a")
            else:
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if rows:
        columns = ["case", *(f"m{m}" for m in metrics)]
        lines += ["Per case:", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        for r in rows:
            lines.append("| " + " | ".join(str(r[c]) if c == "case" else f"{r.get(c, math.nan):.4f}"
                                          for c in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out_dir: Path, split: str) -> list[Path]:
    """Write the JSON, CSV, Markdown and box-plot outputs (module docstring) of ``results``; returns the paths."""
    from attnseg.visualize import plot_metric_boxes

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"metrics_{split}.json"]
    written[0].write_text(json.dumps(results, indent=2, allow_nan=True))
    rows = results.get("cases") or []
    if rows:
        written.append(out_dir / f"cases_{split}.csv")
        write_cases_csv(rows, written[-1])
    written.append(out_dir / f"report_{split}.md")
    written[-1].write_text(format_markdown(results, f"Evaluation on the '{split}' split"))
    names = results.get("class_names") or []
    if rows and names:
        box = out_dir / f"boxplot_{split}.png"
        if plot_metric_boxes(rows, names, box):
            written.append(box)
    return written


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="attnseg-test", description="Evaluate a checkpoint on a dataset split.")
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.ckpt), model weights, or a model "
                                                            "in attnseg's format (folder with model.safetensors + "
                                                            "config.json)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out-dir", default=None, help="folder for the metrics JSON, per-case CSV, Markdown "
                                                         "report and box plot (default: the run's work dir)")
    args = parser.parse_args(argv)

    from attnseg.config import load_config
    from attnseg.engine.runner import evaluate, work_dir_for

    cfg = load_config(args.config, args.overrides)
    results = evaluate(cfg, args.checkpoint, split=args.split)
    print(format_table(results))
    out_dir = Path(args.out_dir) if args.out_dir else work_dir_for(cfg)
    for path in write_report(results, out_dir, args.split):
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
