#!/usr/bin/env bash
# Mutation testing with mutmut 3: plants small bugs (operators, constants, arguments) in one module
# at a time and runs that module's focused tests against each; a mutant the tests do not notice
# "survives". Not part of CI (minutes per module); run it after changing a module or its tests.
#
#   source tools/env.sh
#   tools/mutation.sh metrics trm            # or: tools/mutation.sh all
#   MUTATION_JOBS=2 tools/mutation.sh losses # parallel workers (default 1: shared machines)
#
# Each module runs in its own scratch copy under build/mutation/<module>/ (git-ignored), so the
# working tree is never touched and every module gets its own test selection. Afterwards:
#   cd build/mutation/<module> && mutmut results        # surviving mutants
#   cd build/mutation/<module> && mutmut show <mutant>  # the diff of one mutant
#   tools/mutation.sh --retest trm   # after adding tests: rerun only that module's survivors
#                                    # and the mutants no test reached
#                                    # (the same mutated source, the current tests)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
package="$root/affective_trm_ros"
work_root="${MUTATION_DIR:-$root/build/mutation}"
jobs="${MUTATION_JOBS:-1}"

# module -> file to mutate (inside the affective_trm_ros Python package)
declare -A SOURCE=(
  [metrics]=core/metrics.py
  [trm]=core/trm.py
  [alignment]=core/alignment.py
  [predictor]=core/predictor.py
  [losses]=offline/learning/losses.py
  [train]=offline/learning/train.py
)
# module -> the fast tests that state its behaviour (mutmut runs, per mutant, only those of them
# that call the mutated function)
declare -A TESTS=(
  [metrics]="test/test_metrics.py test/test_metrics_exact.py"
  [trm]="test/test_trm.py test/test_trm_seed.py test/test_trm_reference.py"
  [alignment]="test/test_alignment.py test/test_alignment_exact.py"
  [predictor]="test/test_predictor.py test/test_predictor_exact.py"
  [losses]="test/test_metrics.py test/test_losses_exact.py"
  [train]="test/test_training.py::test_truncated_bptt_in_train_carries_the_state_from_window_to_window
           test/test_training.py::test_saved_checkpoint_holds_the_moving_average_of_the_weights
           test/test_training.py::test_normalisation_comes_from_the_training_split_only
           test/test_training.py::test_one_step_gets_the_gradient_of_the_whole_sequence_loss
           test/test_training.py::test_resets_are_honoured_in_training
           test/test_training.py::test_schedule_and_config_validation
           test/test_training.py::test_training_lowers_the_loss_and_writes_its_files
           test/test_training_loop_exact.py"
)
# module -> the functions whose mutants run (default: all of the file). train.py also holds
# evaluation and bookkeeping; the loop is what its tests state.
declare -A MUTANTS=(
  [train]="*.x_train__mutmut_* *.x_sequence_loss_backward__mutmut_* *WeightEMA* *.x_lr_factor__mutmut_*
           *.x_run_with_resets__mutmut_* *.x_run_sequence__mutmut_* *.x_parameter_groups__mutmut_*"
)
# module -> tests left out: slow ones whose claims the selected tests already state exactly (each
# surviving mutant runs every selected test that reaches it)
declare -A DESELECT=(
  [trm]="test/test_trm.py::test_a_tiny_training_run_decreases_the_loss"
)
ORDER=(metrics trm alignment predictor losses train)

usage() {
  echo "usage: tools/mutation.sh [--retest] all | MODULE [MODULE ...]   (modules: ${ORDER[*]})" >&2
  exit 2
}
retest=0
[[ "${1:-}" == --retest ]] && { retest=1; shift; }
(( $# )) || usage
command -v mutmut >/dev/null || { echo 'mutation.sh: mutmut not found; source tools/env.sh first' >&2; exit 1; }
modules=("$@")
[[ "$1" == all ]] && modules=("${ORDER[@]}")
for name in "${modules[@]}"; do
  [[ -n "${SOURCE[$name]:-}" ]] || { echo "mutation.sh: unknown module '$name'" >&2; usage; }
done

summary=()
for name in "${modules[@]}"; do
  work="$work_root/$name"
  selected=()
  if (( retest )); then
    meta="$work/mutants/affective_trm_ros/${SOURCE[$name]}.meta"
    [[ -f "$meta" ]] || { echo "mutation.sh: no earlier run in $work" >&2; exit 1; }
    rm -rf "$work/test"
    tar -C "$package" --exclude=__pycache__ -cf - test | tar -C "$work" -xf -
    mapfile -t selected < <(python3 -c 'import json, sys
for key, code in json.load(open(sys.argv[1]))["exit_code_by_key"].items():
    if code in (0, 33):  # survived, or no test reached it
        print(key)' "$meta")
    (( ${#selected[@]} )) || { echo "== $name: no surviving mutants to retest"; continue; }
    cp "$meta" "$work/verdicts.before"
  else
    set -f  # the patterns are for mutmut, not for the shell
    # shellcheck disable=SC2206
    selected=(${MUTANTS[$name]:-})
    set +f
    rm -rf "$work"
    mkdir -p "$work"
    # A plain copy of the package and its tests; mutmut imports the mutated copy from mutants/.
    tar -C "$package" --exclude=__pycache__ -cf - affective_trm_ros test | tar -C "$work" -xf -
  fi
  tests=()
  for t in ${TESTS[$name]}; do [[ -f "$work/${t%%::*}" ]] && tests+=("$t"); done
  {
    echo '[mutmut]'
    echo 'source_paths = affective_trm_ros'
    echo "only_mutate = affective_trm_ros/${SOURCE[$name]}"
    # torch is not fork-safe once it has run: fork every mutant from a clean server process.
    echo 'process_isolation = forkserver'
    echo 'pytest_add_cli_args_test_selection ='
    printf '    %s\n' "${tests[@]}"
    echo 'pytest_add_cli_args ='
    printf '    %s\n' -p no:cacheprovider -p no:randomly -q
    for t in ${DESELECT[$name]:-}; do printf '    --deselect\n    %s\n' "$t"; done
  } > "$work/setup.cfg"
  what="${selected:+ (only ${selected[*]})}"
  (( retest )) && what=" (retesting ${#selected[@]} survivors)"
  echo "== $name: mutating ${SOURCE[$name]} against ${tests[*]}$what"
  start=$SECONDS
  (cd "$work" && OMP_NUM_THREADS=1 nice -n 10 mutmut run --max-children "$jobs" "${selected[@]}" \
     > run.log 2>&1) || {
    echo "mutation.sh: mutmut failed for $name; see $work/run.log" >&2
    tail -n 30 "$work/run.log" >&2
    exit 1
  }
  if (( retest )); then
    # A changed test selection makes mutmut forget every verdict; keep the earlier ones of the
    # mutants that were not rerun.
    python3 -c 'import json, sys
before, path = json.load(open(sys.argv[1])), sys.argv[2]
after = json.load(open(path))
codes = after["exit_code_by_key"]
for key, code in before["exit_code_by_key"].items():
    if codes.get(key) is None:
        codes[key] = code
json.dump(after, open(path, "w"))' "$work/verdicts.before" "$meta"
  fi
  (cd "$work" && mutmut export-cicd-stats > /dev/null && mutmut results > survivors.txt 2>&1) || true
  line=$(python3 - "$work/mutants/mutmut-cicd-stats.json" "$name" "$((SECONDS - start))" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
tested = s['killed'] + s['survived'] + s['timeout'] + s['suspicious'] + s['segfault']
caught = s['killed'] + s['timeout'] + s['segfault']
rate = 100.0 * caught / tested if tested else float('nan')
print(f"{sys.argv[2]:<10} {s['total']:>6} {caught:>7} {s['survived']:>8} {s['no_tests']:>8} "
      f"{rate:>7.1f}% {sys.argv[3]:>6}s")
EOF
)
  echo "$line"
  summary+=("$line")
done
echo
printf '%-10s %6s %7s %8s %8s %8s %7s\n' module total killed survived no_tests kill time
printf '%s\n' "${summary[@]}"
echo "survivors: build/mutation/<module>/survivors.txt; a diff: cd build/mutation/<module> && mutmut show NAME"
