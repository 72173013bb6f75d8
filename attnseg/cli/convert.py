"""``attnseg-convert``: official checkpoints and attnseg training checkpoints -> attnseg's own model format.

Three ways in, one way out (a folder with ``model.safetensors`` + ``config.json``, :mod:`attnseg.model_files`)::

    attnseg-convert OFFICIAL.pth --model NAME [--num-classes N] [--in-chans C] [--kwargs JSON] --out DIR
    attnseg-convert OFFICIAL.pth --config CFG [--set KEY=VALUE ...] --out DIR
    attnseg-convert work_dirs/run/checkpoints/last.ckpt --out DIR
    attnseg-convert --list

- ``--model``: a registered backbone, saved as a classifier (``task: classification``; ``--num-classes``
  defaults to the backbone's published class count, its ``default_cfgs`` entry). Official backbone checkpoints.
- ``--config``: the model an experiment config describes (a Segmentor, or a published whole model such as
  ``swin_unetr``, ``att_swin_unet``, ``hybridgnet``, or a DconnNet/MSGA head): official whole-model files, or a
  backbone checkpoint into a Segmentor's backbone (``--no-strict``: the decoder is then left initialised).
- neither: an attnseg training checkpoint (Lightning ``.ckpt``), whose recorded config rebuilds the model.

Files are read with ``weights_only=True`` (a pickle that needs code execution is refused, nothing in it runs)
through :func:`attnseg.checkpoint.load_pretrained`, which converts the official layout, checks every shape and
prints its report (missing, unexpected, dropped, initialised keys). ``--family auto`` (default) names the
converters whose ``is_official`` recognises the file and lets the model's own family convert it; ``--family F``
forces one. ``--list`` prints the families.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnseg.cli.common import run_main
from attnseg.errors import ConfigError

__all__ = ["detect_families", "family_table", "main"]


def detect_families(state_dict: dict[str, Any]) -> list[str]:
    """The converter families whose ``is_official`` recognises ``state_dict`` (sorted; empty when none does)."""
    from attnseg.convert import families, get_converter

    found = []
    for family in families():
        is_official = getattr(get_converter(family), "is_official", None)
        try:
            if is_official is not None and is_official(state_dict):
                found.append(family)
        except Exception:  # noqa: BLE001 - a detector refusing a foreign layout is a no
            continue
    return found


def family_table() -> list[tuple[str, str]]:
    """``(family, the first line of its converter's docstring)`` for every converter family."""
    from attnseg.convert import families, get_converter

    rows = []
    for family in families():
        doc = (get_converter(family).__doc__ or "").strip().splitlines()
        rows.append((family, doc[0] if doc else ""))
    return rows


def _model_config(args: argparse.Namespace) -> Any:
    """The config of the model to build: the ``--config`` file, or a classifier around ``--model``."""
    from attnseg.config import ModelConfig, load_config

    if args.config is not None:
        return load_config(args.config, args.overrides)
    kwargs = {}
    if args.kwargs:
        try:
            kwargs = json.loads(args.kwargs)
        except ValueError as e:
            raise ConfigError(f"--kwargs is not JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--kwargs must be a JSON object, got {args.kwargs}")
    num_classes = args.num_classes
    if num_classes is None:
        from attnseg.backbones import pretrained_cfg

        try:
            num_classes = int(pretrained_cfg(args.model)["num_classes"])
        except KeyError:
            raise ConfigError(f"--num-classes is needed: {args.model} has no published class count") from None
    if num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {num_classes}")
    from pydantic import ValidationError

    try:
        return ModelConfig.model_validate({"backbone": {"name": args.model, **kwargs}, "num_classes": num_classes,
                                           "in_chans": args.in_chans})
    except ValidationError as e:
        raise ConfigError(f"--model/--kwargs/--num-classes/--in-chans: {e}") from None


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="attnseg-convert", description="Convert an official checkpoint (or an "
                                     "attnseg training checkpoint) to attnseg's own format: model.safetensors + "
                                     "config.json.")
    parser.add_argument("checkpoint", nargs="?", help="official .pth/.pt/.bin/.safetensors file, or an attnseg "
                                                      "training checkpoint (.ckpt)")
    parser.add_argument("--out", help="output folder (model.safetensors + config.json)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", help="registered backbone name (saved as a classifier)")
    what.add_argument("--config", help="experiment config (YAML) describing the model")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --config: override a config key (repeatable)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="with --model: classes of the classifier (default: the published count)")
    parser.add_argument("--in-chans", type=int, default=3, help="with --model: input channels (default 3)")
    parser.add_argument("--kwargs", default=None, help="with --model: backbone keyword arguments as JSON, e.g. "
                                                       "'{\"depths\": [1, 1, 2, 1]}'")
    parser.add_argument("--family", default="auto", help="converter family (default: auto, the model's own)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="allow missing/unexpected keys (reported) instead of refusing the file")
    parser.add_argument("--list", action="store_true", help="list the converter families and exit")
    args = parser.parse_args(argv)

    if args.list:
        for family, line in family_table():
            print(f"{family:16s} {line}")
        return 0
    if not args.checkpoint or not args.out:
        raise ConfigError("give a checkpoint and --out DIR (or --list)")
    for flag, value in (("--set", args.overrides), ("--kwargs", args.kwargs), ("--num-classes", args.num_classes)):
        if value and (args.model if flag == "--set" else args.config) is not None:
            raise ConfigError(f"{flag} goes with {'--config' if flag == '--set' else '--model'}")

    from attnseg.model_files import export_checkpoint, save_model

    if args.model is None and args.config is None:
        out = export_checkpoint(args.checkpoint, args.out)
        print(f"wrote {out} (from the training checkpoint {args.checkpoint})")
        return 0

    from attnseg.checkpoint import load_pretrained, read_state_dict
    from attnseg.convert import families
    from attnseg.models.builder import build_model

    family = None if args.family == "auto" else args.family
    if family is not None and family not in families():
        raise ConfigError(f"--family {family}: no such converter (known: {', '.join(families())})")
    detected = detect_families(read_state_dict(args.checkpoint))
    print(f"{args.checkpoint}: official layout of {', '.join(detected) if detected else 'no known family'}")
    cfg = _model_config(args)
    model = build_model(cfg, task="classification" if args.model else None)
    report = load_pretrained(model, args.checkpoint, strict=args.strict, family=family)
    print(f"loaded into {type(model).__name__}: {report}")
    out = save_model(model, args.out, cfg, source=str(Path(args.checkpoint).name))
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
