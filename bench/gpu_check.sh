#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py) under a time limit, its JSON at ${OUT:-outputs}/gpu_check.json.
#
#   bash bench/gpu_check.sh                        # on a lent GPU (the device tool sets $OUT)
#   bash bench/gpu_check.sh --device cpu --lm-layers 2 --vision-layers 2 --repeats 1   # smoke run
#
# Wheels carried in .whl/ (transformers 5.23 where the machine's is older) are installed into a
# scratch folder first. PYTHON picks the interpreter (default python3), GPU_CHECK_TIMEOUT the
# limit in seconds (default 480). Exit status: the script's (2: no CUDA or too old a transformers,
# 1: a part failed), or 124 at the time limit, when the JSON holds the parts that finished.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
limit="${GPU_CHECK_TIMEOUT:-480}"
out="${OUT:-outputs}/gpu_check.json"
if compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/gpu_check_site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the device machine has torch and transformers but not this project installed: the checkout's
# autoselect/ comes from the repository root (bench/, for prefill.py, is the script's own folder)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0
timeout "$limit" "$python" bench/gpu_check.py --out "$out" "$@" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check: stopped at the ${limit} s limit; $out holds the parts that finished" >&2
fi
exit "$status"
