#!/usr/bin/env bash
# summary.sh LOG SKIPS - the test summary of `make test`: tests counted by name from cargo's
# per-test lines in LOG, minus those that recorded a skip in SKIPS (tests/support::skipped).
# Prints every skip and partial skip with its reason and every failed test by name, then
#   summary: N passed, N skipped, N failed
# and exits non-zero when a test failed, a skip names no test that ran, or no test ran at all.
set -uo pipefail
log=$1 skips=$2
awk -v skips="$skips" '
  # cargo prints "test NAME ... ok|FAILED|ignored" per test (ignored: not run by this command).
  /^test .* \.\.\. (ok|FAILED)$/ {
    name = $2; result = $NF
    if (result == "ok") ok[name]++; else { failed[name]++; nfailed++ }
    total++
  }
  END {
    while ((getline line < skips) > 0) {
      kind = line; sub(/: .*/, "", kind)
      rest = substr(line, length(kind) + 3)
      name = rest; sub(/: .*/, "", name)
      why = substr(rest, length(name) + 3)
      if (!(name in ok)) { printf "  %s names no test that passed here: %s\n", kind, line; bad++ ; continue }
      if (kind == "skipped") { skipped[name] = why; nskipped++ }
      else printf "  partly skipped: %s: %s\n", name, why
    }
    for (n in skipped) printf "  skipped: %s: %s\n", n, skipped[n]
    for (n in failed) printf "  FAILED: %s\n", n
    passed = total - nfailed - nskipped
    printf "summary: %d passed, %d skipped, %d failed\n", passed, nskipped, nfailed
    if (total == 0) { print "summary: no test ran"; exit 1 }
    if (nfailed > 0 || bad > 0) exit 1
  }
' "$log"
