#!/usr/bin/env bash
# Runs shellcheck over every shell script in the repository: tracked files named
# *.sh and tracked files whose first line is a shell shebang (sh, bash, dash,
# ash, busybox sh), so a new script is checked without being listed here.
# Settings, and the checks turned off with why: .shellcheckrc.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v shellcheck >/dev/null || {
    echo "shellcheck is not installed (.ci/run installs it: apt-get install shellcheck)" >&2
    exit 1
}
shebang='^#!(/usr)?/bin/(env +)?(ba|da|a)?sh( |$)|^#!/bin/busybox +sh( |$)'
scripts=()
while IFS= read -r -d '' f; do
    [ -f "$f" ] || continue
    case $f in
        *.sh) scripts+=("$f") ;;
        *) if head -c 128 -- "$f" | head -n 1 | grep -aEq "$shebang"; then scripts+=("$f"); fi ;;
    esac
done < <(git ls-files -z)
[ "${#scripts[@]}" -gt 0 ] || { echo "no shell scripts found (not a git checkout?)" >&2; exit 1; }
echo "shellcheck: ${#scripts[@]} scripts"
shellcheck -x "${scripts[@]}"
