#!/usr/bin/env python
"""Thin wrapper: same as the `attnseg-test` console script."""

import sys

from attnseg.cli.test import main

if __name__ == "__main__":
    sys.exit(main())
