#!/usr/bin/env python
"""Thin wrapper: same as the `attnseg-convert` console script."""

import sys

from attnseg.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
