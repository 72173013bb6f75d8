"""`make demo` end to end: train, evaluate (mean Dice >= 0.80), infer on odd-size PNGs."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_reaches_dice_threshold_and_writes_overlays(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", REPO / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--work-dir", str(tmp_path), "--set", "trainer.progress_bar=none"]) == 0
    metrics = json.loads((tmp_path / "metrics_val.json").read_text())
    assert metrics["mDice"] >= 0.80
    mask = np.array(Image.open(tmp_path / "predictions" / "sample_0_mask.png"))
    assert mask.shape == (333, 517) and set(np.unique(mask)) <= {0, 1, 2, 3}
    assert np.array(Image.open(tmp_path / "predictions" / "sample_0_overlay.png")).shape == (333, 1034, 3)
