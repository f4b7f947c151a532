#!/usr/bin/env bash
# Comparative benchmark: livemirror vs qemu-nbd / nbdkit / nbd-server / dd / qemu-img / nbdcopy.
#
#   benches/compare/run.sh [--quick] [--reps N] [--out FILE] [--sections ABCDE] [--no-build]
#                          [--disk-dir DIR] [--tmpfs-dir DIR] [--floors 64M,128M,...]
#
# (--sections: A = serving over a Unix socket and over TCP; A1 / A2 = only one of the two;
#  --floors: section C also with these copy floors, serve --min-rate)
#
# Builds the release binary, runs every section in one go and writes a markdown
# table (default benches/compare/results/latest.md) plus a JSON file next to it.
# Needs root (drop_caches), fio with the nbd engine, qemu-nbd, qemu-img, nbdkit,
# nbd-server, nbdcopy and dd. See benches/compare/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

build=1
for a in "$@"; do
    [[ "$a" == "--no-build" ]] && build=0
    [[ "$a" == "-h" || "$a" == "--help" ]] && build=0
done

if [[ $build == 1 ]]; then
    (cd "$repo" && cargo build --release --quiet) >&2
fi

py="${PYTHON:-python3}"
export LMBENCH_CMDLINE="benches/compare/run.sh${*:+ $*}"
"$py" "$here/bench.py" --repo "$repo" "$@"

# A full run of every section into the default file is README's table: splice it
# in between the markers (headings one level down, per-run command lists left
# out: they stay in the results file).
case " $* " in
*" --quick "* | *" --reps "* | *" --out "* | *" --sections "* | *" --floors "* | *" -h "* | *" --help "*) exit 0 ;;
esac
"$py" - "$repo/README.md" "$here/results/latest.md" <<'PY'
import re, sys
readme, results = sys.argv[1], sys.argv[2]
body, skip = [], False
for line in open(results).read().splitlines():
    if line == "Commands:":
        skip = True
        continue
    if skip and (line.startswith("- ") or not line.strip()):
        continue
    skip = False
    if line.startswith("#"):
        line = "##" + line
    body.append(line)
text = open(readme).read()
begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
if begin not in text or end not in text:
    sys.exit("README.md has no bench markers; results are in " + results)
pre, rest = text.split(begin, 1)
_, post = rest.split(end, 1)
open(readme, "w").write(pre + begin + "\n" + "\n".join(body).strip() + "\n" + end + post)
print("README.md: benchmark tables updated from " + results, file=sys.stderr)
PY
