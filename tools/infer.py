#!/usr/bin/env python
"""Thin wrapper: same as the `attnseg-infer` console script."""

import sys

from attnseg.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
