#!/usr/bin/env bash
# The Triton kernel tests (under TRITON_INTERPRET=1) against several Triton releases, each in its own venv
# outside the repository, with the torch CI uses.  Prints one line per version: passed/failed and seconds.
#
#   bench/triton_matrix.sh [VERSION ...]          default: 3.6.0 3.7.1 3.9.0
#
# Environment:
#   MATRIX_DIR    where the venvs live (default /tmp/attnrewrite-triton-matrix); an existing venv whose
#                 triton already has the version is reused, so a second run only runs the tests
#   MATRIX_TESTS  the pytest targets (default: the kernel tests that launch Triton kernels, below;
#                 "tests/kernels" for the whole kernel floor)
#   PYTHON        the interpreter the venvs are made from (default python3)
#
# Triton 3.6's interpreter converts one-element arrays with int(), which numpy >= 2.4 refuses, so its venv
# gets numpy < 2.4 (a constraint of that interpreter, not of the kernels).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
MATRIX_DIR=${MATRIX_DIR:-/tmp/attnrewrite-triton-matrix}
PYTHON=${PYTHON:-python3}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(3.6.0 3.7.1 3.9.0)
TESTS=${MATRIX_TESTS:-"tests/kernels/linear/test_linear_triton.py tests/kernels/sigmoid/test_sigmoid_triton.py \
tests/kernels/sliding_window/test_sliding_window_triton.py tests/kernels/test_interpreter_bf16.py"}
mkdir -p "$MATRIX_DIR"
# CI's constraints without its triton pin (that pin is what this script varies)
grep -v '^triton' .ci/constraints.txt > "$MATRIX_DIR/constraints.txt"

summary=()
status=0
for version in "${VERSIONS[@]}"; do
    venv="$MATRIX_DIR/venv-triton-$version"
    if ! "$venv/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$version')" 2>/dev/null; then
        echo "== building $venv"
        numpy="numpy"
        case "$version" in 3.[0-6].*) numpy="numpy<2.4" ;; esac
        "$PYTHON" -m venv "$venv" &&
            "$venv/bin/python" -m pip install -q -c "$MATRIX_DIR/constraints.txt" "torch==2.13.0" "triton==$version" \
                "$numpy" transformers tqdm pytest hypothesis safetensors networkx ||
            { summary+=("triton $version: venv could not be built"); status=1; continue; }
    fi
    echo "== triton $version: $TESTS"
    start=$(date +%s)
    # shellcheck disable=SC2086  # TESTS is a list of paths
    PYTHONPATH="$REPO" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1 \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" $TESTS > "$MATRIX_DIR/triton-$version.log" 2>&1
    rc=$?
    seconds=$(( $(date +%s) - start ))
    tail -n 1 "$MATRIX_DIR/triton-$version.log"
    summary+=("triton $version: $(tail -n 1 "$MATRIX_DIR/triton-$version.log" | sed 's/=//g; s/^ *//; s/ *$//') (rc $rc, ${seconds} s wall)")
    [ "$rc" -eq 0 ] || status=1
done
echo
printf '%s\n' "${summary[@]}"
exit $status
