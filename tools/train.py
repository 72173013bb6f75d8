#!/usr/bin/env python
"""Thin wrapper: same as the `attnseg-train` console script."""

import sys

from attnseg.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
