#!/usr/bin/env bash
# Mutation check of the modules whose values users cite (see docs/testing.md).
# Usage: bash scripts/mutation.sh [TARGET ...]      TARGET: a name from the table below (default: all)
# Each target is mutated in a throw-away copy of the tracked tree (never this checkout; untracked files included) by mutmut, and the fast
# tests that cover it run against every mutant. Writes mutation-report/<target>.txt (each surviving mutant with its
# diff) and mutation-report/summary.txt (killed / survived per target). Minutes per target: not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bash scripts/setup_env.sh test >/dev/null
bin=$root/.venv/bin
"$bin/python" -c "import mutmut" 2>/dev/null || "$bin/python" -m pip install -q --disable-pip-version-check \
  "mutmut>=3.3,<4" "torch==2.14.1" "torchvision==0.29.1"

# name | files mutmut may mutate (globs) | covering tests
targets=(
  "metrics|textseg_cli/metrics/*|tests/test_metrics.py tests/test_metrics_edges.py tests/test_cuda_readiness.py::test_device_lcc_equals_scipy_voxel_for_voxel tests/test_cuda_readiness.py::test_lcc_of_a_device_tensor_stays_on_the_device"
  "sliding_window|textseg_cli/inference/sliding_window.py|tests/test_sliding_window.py tests/test_sliding_window_edges.py"
  "losses|textseg_cli/methods/losses.py|tests/test_losses.py tests/test_ssl_losses.py"
  "text_losses|textseg_cli/methods/text_losses.py|tests/test_text_fusion.py tests/test_text_methods.py"
  "splits|textseg_cli/data/splits.py|tests/test_prepared_format.py tests/test_safety_cli.py::test_labeled_percentage_rounds_half_up tests/test_safety_cli.py::test_labeled_percentage_on_the_command_line"
  "sampling|textseg_cli/data/sampling.py|tests/test_engine.py tests/test_prefetch.py tests/test_fidelity_defaults.py tests/test_safety_cli.py::test_no_label_file_of_an_unlabeled_case_is_opened_while_the_files_exist"
  "checkpoint|textseg_cli/runs/checkpoint.py|tests/test_engine.py"
)
out=$root/mutation-report
mkdir -p "$out"
summary=$out/summary.txt.tmp
: > "$summary"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
children=${MUTATION_JOBS:-$(nproc)}

for t in "${targets[@]}"; do
  IFS='|' read -r name globs tests <<<"$t"
  if [ $# -gt 0 ] && [[ ! " $* " =~ " $name " ]]; then continue; fi
  work=$(mktemp -d "${TMPDIR:-/tmp}/textseg-mutation.XXXXXX")
  git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp -P --parents {} "$work"
  selection=""
  for f in $tests; do [ -f "$work/${f%%::*}" ] && selection="$selection\"$f\", "; done
  cat >> "$work/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["textseg_cli"]
only_mutate = ["$globs"]
pytest_add_cli_args_test_selection = [${selection%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
also_copy = ["tests", "prompts", "pyproject.toml"]
EOF
  echo "== $name: $globs  (tests: $tests)"
  (cd "$work" && "$bin/mutmut" run --max-children "$children" >"$work/run.log" 2>&1) \
    || { tail -n 30 "$work/run.log"; echo "mutmut failed for $name (log above)"; rm -rf "$work"; exit 1; }
  (cd "$work" && "$bin/mutmut" results --all true 2>/dev/null || true) >"$work/results.txt"
  killed=$(grep -c ': killed' "$work/results.txt" || true)
  survivors=$(grep -E ': (survived|no tests|timeout|suspicious)' "$work/results.txt" | awk -F: '{print $1}' | tr -d ' ')
  n_surv=$(printf '%s\n' $survivors | grep -c . || true)
  {
    echo "# $name: $globs — $killed killed, $n_surv not killed (tests: $tests)"
    for m in $survivors; do
      echo; echo "## $m ($(grep -F "$m:" "$work/results.txt" | awk -F': ' '{print $2}'))"
      (cd "$work" && "$bin/mutmut" show "$m" 2>/dev/null | grep -E '^[-+]' | grep -vE '^(\+\+\+|---)') || true
    done
  } >"$out/$name.txt"
  echo "$name: $killed killed, $n_surv not killed" | tee -a "$summary"
  rm -rf "$work"
done
mv "$summary" "$out/summary.txt"
echo "survivors with diffs: $out/<target>.txt; scores: $out/summary.txt"
