#!/usr/bin/env bash
# The Triton kernel tests (under TRITON_INTERPRET=1) against several Triton releases, each in its own venv
# outside the repository, with the torch CI uses.  Prints one line per version: passed/failed and seconds.
#
#   bench/triton_matrix.sh [VERSION ...]          default: 3.6.0 3.7.1 3.9.0
#
# Environment:
#   MATRIX_DIR    where the venvs live (default /tmp/attnrewrite-triton-matrix); an existing venv whose
#                 triton already has the version is reused, so a second run only runs the tests
#   MATRIX_GROUPS which groups of kernel tests to run (default: all seven, "linear sigmoid sliding_window bf16
#                 summary hashed score_mods"; see TEST_GROUPS below; score_mods: the generated score-modification
#                 functions and a chain of nonlinear steps in every kernel family that takes one): the linear, sigmoid and sliding-window test files whole,
#                 and for summary and hashed a bounded selection that still launches every kernel (summary:
#                 forward+backward with learned summaries, GQA and padding, varlen forward+backward, decode over
#                 the cache's store and through SummaryCache's decode route; hashed: codes, selection +
#                 gathered attention forward+backward, decode over the cache's packed codes, far keys,
#                 learned hashes)
#   MATRIX_TESTS  the pytest targets, replacing MATRIX_GROUPS ("tests/kernels" for the whole kernel floor)
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
S=tests/kernels/summary
H=tests/kernels/hashed
declare -A TEST_GROUPS=(
    [linear]="tests/kernels/linear/test_linear_triton.py"
    [sigmoid]="tests/kernels/sigmoid/test_sigmoid_triton.py"
    [sliding_window]="tests/kernels/sliding_window/test_sliding_window_triton.py"
    [bf16]="tests/kernels/test_interpreter_bf16.py"
    [summary]="$S/test_summary_triton.py::test_outputs_and_gradients_match_the_reference[causal_learned_gqa_padding] \
$S/test_summary_triton.py::test_decode_kernel_over_the_cache_equals_the_op[True] \
$S/test_varlen_triton.py::test_packed_kernels_match_the_reference[one_causal_learned] \
tests/decode/test_summary_cache.py::test_transformers_decode_steps_take_the_triton_decode_kernel"
    [hashed]="$H/test_hashed_triton.py::test_codes_equal_the_torch_packing_bit_for_bit[64-True] \
$H/test_hashed_triton.py::test_selection_output_and_gradients_equal_the_reference[causal-padding-g1] \
$H/test_hashed_triton.py::test_decode_over_the_cache_equals_the_reference[True] \
$H/test_far_triton.py::test_kernels_round_far_keys_as_the_reference[float16-additive-False] \
$H/test_learned_triton.py::test_learned_hashes_on_the_kernels_match_the_torch_path[gqa_causal]"
    [score_mods]="tests/kernels/test_triton_score_mods.py \
tests/kernels/sigmoid/test_sigmoid_score_mod.py::test_triton_kernels_apply_the_modification[softcap_sigmoid] \
tests/kernels/sigmoid/test_sigmoid_score_mod.py::test_triton_kernels_apply_the_modification[root] \
tests/kernels/sliding_window/test_sliding_window_score_mod.py::test_triton_kernels_apply_the_modification[chain_causal] \
$S/test_summary_score_mod.py::test_triton_kernels_apply_the_modification[chain_causal] \
$H/test_hashed_score_mod.py::test_triton_kernels_apply_the_modification[chain_bias]"
)
if [ -n "${MATRIX_TESTS:-}" ]; then
    TESTS=$MATRIX_TESTS
else
    TESTS=""
    for group in ${MATRIX_GROUPS:-linear sigmoid sliding_window bf16 summary hashed score_mods}; do
        [ -n "${TEST_GROUPS[$group]:-}" ] || { echo "unknown group $group (known: ${!TEST_GROUPS[*]})" >&2; exit 2; }
        TESTS="$TESTS ${TEST_GROUPS[$group]}"
    done
fi
set -f  # the test ids' [parameters] are not globs
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
