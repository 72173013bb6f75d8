#!/usr/bin/env python
"""Thin wrapper around attnseg.datasets.prepare: build the brain MRI datasets (brain mask, tissue, AAL) from the
MNI152 (nilearn) and Colin27/AAL (mricron-data) templates. See `python tools/prepare_data.py --help`."""

import sys

from attnseg.datasets.prepare import main

if __name__ == "__main__":
    sys.exit(main())
