"""Kill test: a training process killed with SIGKILL (mid-step, mid-checkpoint-write, before a checkpoint's rename,
or at a random moment) resumes from its last complete checkpoint and ends exactly where an uninterrupted run
ends: weights, optimizer moments, scheduler, EMA weights, step count and RNG state.

Each killed run is a real child process (``python DRIVER MODE AT CONFIG``): the driver arms the kill, then runs
``attnseg.cli.train``. Deterministic CPU training, ``num_workers: 0``, random augmentation on.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

EPOCHS, BATCHES = 4, 2  # 8 optimizer steps; last.ckpt after every epoch

DRIVER = textwrap.dedent('''
    """Arm a SIGKILL, then train: python driver.py MODE AT CONFIG [ARGS...]."""
    import os
    import signal
    import sys

    import torch

    mode, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


    def die():
        os.kill(os.getpid(), signal.SIGKILL)


    if mode == "step":  # inside the training step of global step at, after its forward pass
        from attnseg.engine import tasks

        forward = tasks.SegmentationTask.training_step

        def training_step(self, batch, batch_idx):
            loss = forward(self, batch, batch_idx)
            if self.global_step == at:
                die()
            return loss

        tasks.SegmentationTask.training_step = training_step
    elif mode == "write":  # the at-th checkpoint file is half written when the process dies
        import io

        save = torch.save
        calls = [0]

        def torch_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, bytes, os.PathLike)):  # checkpoints are written to an open temporary file
                return save(obj, f, *args, **kwargs)
            calls[0] += 1
            if calls[0] == at:
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return save(obj, f, *args, **kwargs)

        torch.save = torch_save
    elif mode == "rename":  # the at-th checkpoint is complete in its temporary file, not yet renamed
        import attnseg.checkpoint as checkpoint

        replace = os.replace
        calls = [0]

        def os_replace(src, dst):
            if str(dst).endswith(".ckpt"):
                calls[0] += 1
                if calls[0] == at:
                    die()
            return replace(src, dst)

        checkpoint.os.replace = os_replace  # the os module: every os.replace, counted for .ckpt targets
    from attnseg.cli import train

    sys.exit(train.main(argv))
''')


def _config(path: Path, work: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "work_dir": str(work),
        "seed": 3,
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8},
                  "num_classes": 3},
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [32, 32],
                             "num_train": 2 * BATCHES, "num_val": 2, "num_test": 2},
                 "batch_size": 2, "num_workers": 0,
                 "augment": {"hflip": 0.5, "vflip": 0.5, "gaussian_noise": 0.05}},
        "optimizer": {"lr": 0.003},
        "scheduler": {"name": "cosine", "warmup_steps": 1},
        "trainer": {"max_epochs": EPOCHS, "progress_bar": "none", "loggers": ["csv"], "deterministic": True,
                    "accelerator": "cpu", "devices": 1, "ema": {"enabled": True, "decay": 0.9}},
        "evaluation": {"hd95": False},
    }))
    return path


def _run(tmp_path: Path, name: str, argv: list[str], mode: str | None = None, at: int = 0,
         kill_after: float | None = None) -> int:
    """Train in a child process; ``mode``/``at`` arm the driver's kill, ``kill_after`` kills it from outside."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), mode or "none", str(at), *argv]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=600)


def _final_state(work: Path) -> dict:
    """``last.ckpt`` of the run in ``work``, with ``work`` written ``WORK`` in its strings (the checkpoint callback
    keeps paths), so that two runs' checkpoints compare."""
    def relative(x):
        if isinstance(x, str):
            return x.replace(str(work), "WORK")
        if isinstance(x, dict):
            return {relative(k): relative(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(relative(v) for v in x)
        return x

    return relative(torch.load(work / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True))


def _differences(a, b, where="") -> list[str]:
    """Where two checkpoints differ: every tensor, number, string and structure compared exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        return [] if tensors and a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} and {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == EPOCHS * BATCHES and a["epoch"] == b["epoch"] == EPOCHS - 1
    assert any("EMA" in k for k in a["callbacks"])
    differences = _differences(a, b)
    assert not differences, differences[:20]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, float]:
    """The uninterrupted run's final checkpoint and its wall time (seconds, process start included)."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = _config(tmp / "cfg.yaml", tmp / "work")
    start = time.perf_counter()
    assert _run(tmp, "straight", [str(cfg)]) == 0, (tmp / "straight.log").read_text()[-3000:]
    return _final_state(tmp / "work"), time.perf_counter() - start


@pytest.mark.parametrize("mode, at", [
    ("step", 5),     # in epoch 2's second step: last.ckpt is epoch 1's
    ("write", 5),    # the fifth checkpoint file (epoch 2's best or last) half written
    ("rename", 4),   # epoch 1's last.ckpt complete in its temporary file, never renamed
])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, mode, at):
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "work")
    ckpt_dir = tmp_path / "work" / "checkpoints"
    rc = _run(tmp_path, "killed", [str(cfg)], mode, at)
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    # what the kill left: complete checkpoints only under their names; a partial one only as a temporary file
    left = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert left["global_step"] in {BATCHES * e for e in range(1, EPOCHS)} and left["global_step"] < EPOCHS * BATCHES
    if mode in ("write", "rename"):
        assert list(ckpt_dir.glob(".*.tmp")), "the interrupted write leaves its temporary file"
    assert _run(tmp_path, "resumed", [str(cfg), "--resume"]) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert not list(ckpt_dir.glob(".*.tmp"))  # the resumed run removed the unfinished write
    _assert_same_run(_final_state(tmp_path / "work"), uninterrupted[0])


def test_killed_at_random_moments_until_done(tmp_path, uninterrupted):
    """SIGKILL from outside after a random delay (10-50% of an uninterrupted run's time for the first, fresh run, so
    that it is killed; 20-90% afterwards), again and again, resuming each time (or starting afresh while no
    checkpoint exists), until a run completes. The seed is in the failure message; ATTNSEG_KILL_SEED replays it."""
    seed = int(os.environ.get("ATTNSEG_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "work")
    ckpt_dir = tmp_path / "work" / "checkpoints"
    final, duration = uninterrupted
    kills = 0
    for attempt in range(12):
        resume = (ckpt_dir / "last.ckpt").is_file()
        if not resume and ckpt_dir.is_dir():  # killed before its first checkpoint: nothing to keep
            for stale in ckpt_dir.iterdir():
                stale.unlink()
        argv = [str(cfg), "--resume"] if resume else [str(cfg)]
        # the first (fresh, whole) run is killed within half the uninterrupted run's time, so at least once
        share = rng.uniform(0.1, 0.5) if attempt == 0 else rng.uniform(0.2, 0.9)
        rc = _run(tmp_path, f"run{attempt}", argv, kill_after=None if attempt == 11 else share * duration)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, f"seed {seed}: " + (tmp_path / f"run{attempt}.log").read_text()[-3000:]
        kills += 1
    assert rc == 0 and kills >= 1, f"seed {seed}: {kills} kills, last exit status {rc}"
    _assert_same_run(_final_state(tmp_path / "work"), uninterrupted[0])
