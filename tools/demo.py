#!/usr/bin/env python
"""``make demo``: train, evaluate and run inference on the embedded synthetic data, end to end.

1. trains MambaOut-femto + the UNETR decoder on ``synthetic2d`` (configs/demo/mambaout_femto_unetr_synthetic2d.yaml);
2. evaluates the last checkpoint on the validation split, prints the metrics table, and fails (exit 1)
   when the mean Dice is below ``--min-dice`` (0.80);
3. writes a few synthetic test images as PNG (one of them 333x517, not a multiple of anything) and runs
   ``attnseg-infer`` on them, writing masks and overlays.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo" / "mambaout_femto_unetr_synthetic2d.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--work-dir", default="work_dirs/demo")
    parser.add_argument("--min-dice", type=float, default=0.80)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from attnseg.cli.infer import main as infer_main
    from attnseg.cli.test import format_table, write_report
    from attnseg.config import load_config
    from attnseg.datasets import build_dataset
    from attnseg.engine.runner import evaluate, train

    start = time.time()
    work = Path(args.work_dir)
    if work.exists():
        # The demo owns its folder: start clean so the run never mixes with an earlier demo's checkpoints.
        shutil.rmtree(work)
    overrides = [*args.overrides, f"work_dir={work}"]
    cfg = load_config(args.config, overrides)
    print(f"[demo] training {cfg.model.backbone.name} + {cfg.model.head.name} on {cfg.data.dataset.name} ...")
    result = train(cfg, work_dir=work)
    print(f"[demo] trained {result['global_step']} steps in {time.time() - start:.0f} s")

    metrics = evaluate(cfg, result["last_checkpoint"], split="val")
    print(format_table(metrics))
    write_report(metrics, work, "val")  # metrics_val.json, cases_val.csv, report_val.md, boxplot_val.png

    # Inference on PNG files of odd sizes, drawn from the test split of the same generator.
    images_dir = work / "demo_inputs"
    images_dir.mkdir(parents=True, exist_ok=True)
    ds_kwargs = dict(cfg.data.dataset.kwargs)
    for i, size in enumerate([(333, 517), (96, 96), (150, 121)]):
        ds_kwargs["image_size"] = list(size)
        sample = build_dataset(cfg.data.dataset.name, split="test", transform=None, **ds_kwargs)[i]
        img = (sample["image"].permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(images_dir / f"sample_{i}.png")
    rc = infer_main(["--config", args.config, *sum((["--set", o] for o in overrides), []),
                     "--checkpoint", result["last_checkpoint"], str(images_dir), "--out", str(work / "predictions")])
    if rc != 0:
        return rc
    mask = np.array(Image.open(work / "predictions" / "sample_0_mask.png"))
    if mask.shape != (333, 517):
        print(f"[demo] FAILED: inference mask has shape {mask.shape}, expected (333, 517)")
        return 1

    dice = metrics["mDice"]
    elapsed = time.time() - start
    print(f"[demo] validation mean Dice {dice:.4f} (threshold {args.min_dice}); total {elapsed:.0f} s")
    print(f"[demo] overlays in {work / 'predictions'}")
    if not dice >= args.min_dice:
        print(f"[demo] FAILED: mean Dice {dice:.4f} is below {args.min_dice}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
