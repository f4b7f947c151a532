#!/usr/bin/env bash
# Builds livemirror's Debian package with cargo-deb. What goes where is the
# [package.metadata.deb] table in Cargo.toml; the maintainer scripts are in packaging/debian/.
#
#   scripts/build-deb.sh                 cargo build --release, then target/debian/livemirror_*.deb
#   scripts/build-deb.sh --bin PATH      package the binary PATH instead of building one (the VM
#                                        tests package exactly the binary they test)
#   --deb-version V                      the package's version (default: Cargo.toml's, revision 1)
#   --output DIR                         where the .deb goes (default: target/debian)
#
# The binary is staged in a target directory of its own, with the man pages and shell
# completions it generates from its CLI definition, and cargo-deb packages that directory
# (CARGO_TARGET_DIR), so a package always holds one binary and the pages made from it. File
# times are the last commit's (SOURCE_DATE_EPOCH, unless set), so the same tree and binary make
# the same bytes. The last line printed is the path of the .deb.
# Needs cargo-deb (`cargo install cargo-deb --version 3.8.0 --locked`; .ci/run installs it) and
# dpkg-dev (dpkg-shlibdeps computes the library dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

die() { echo "build-deb.sh: $*" >&2; exit 1; }
usage() { sed -n '2,17s/^# \{0,1\}//p' "$0"; }

BIN='' VERSION='' OUTPUT=''
while [ $# -gt 0 ]; do
  case $1 in
    --bin) [ $# -ge 2 ] || die "--bin needs a path"; BIN=$2; shift ;;
    --deb-version) [ $# -ge 2 ] || die "--deb-version needs a version"; VERSION=$2; shift ;;
    --output) [ $# -ge 2 ] || die "--output needs a directory"; OUTPUT=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $1" ;;
  esac
  shift
done

cargo deb --version >/dev/null 2>&1 \
  || die "cargo-deb is missing: cargo install cargo-deb --version 3.8.0 --locked"
command -v dpkg-shlibdeps >/dev/null 2>&1 || die "dpkg-shlibdeps is missing: apt-get install dpkg-dev"

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
if [ -z "$BIN" ]; then
  cargo build --release --locked
  BIN=$TARGET_DIR/release/livemirror
fi
[ -x "$BIN" ] || die "no executable livemirror binary at $BIN"
BIN=$(readlink -f "$BIN")
OUTPUT=${OUTPUT:-$TARGET_DIR/debian}
mkdir -p "$OUTPUT"
OUTPUT=$(readlink -f "$OUTPUT")

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/livemirror-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
# cargo-deb maps the asset prefix target/release/ to $CARGO_TARGET_DIR/release/.
install -D -m 0755 "$BIN" "$STAGE/release/livemirror"
"$STAGE/release/livemirror" generate man "$STAGE/release/package/man" >/dev/null \
  || die "$BIN generate man failed"
# Compressed here: cargo-deb compresses the pages it finds in the source tree, but takes anything
# under target/release/ for a build product and leaves it as it is. (-n: no name or time inside.)
gzip -9n "$STAGE"/release/package/man/*.1
for shell in bash zsh fish; do
  "$STAGE/release/livemirror" generate completions "$shell" --dir "$STAGE/release/package/completions" >/dev/null \
    || die "$BIN generate completions $shell failed"
done

if [ -z "${SOURCE_DATE_EPOCH:-}" ] && SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null); then
  export SOURCE_DATE_EPOCH
fi

# --strip: the release profile keeps line tables for profiling (Cargo.toml), which the package
# does not need (the initramfs hooks strip their copy too).
ARGS=(--no-build --strip --locked --output "$OUTPUT")
[ -n "$VERSION" ] && ARGS+=(--deb-version "$VERSION")
# (cargo-deb prints the package's path on stdout, its progress and warnings on stderr)
if ! CARGO_TARGET_DIR=$STAGE cargo deb "${ARGS[@]}" >"$STAGE/out" 2>"$STAGE/log"; then
  cat "$STAGE/log" >&2
  die "cargo deb failed"
fi
DEB=$(tail -n 1 "$STAGE/out")
[ -f "$DEB" ] || { cat "$STAGE/out" "$STAGE/log" >&2; die "cargo deb did not name the package it wrote"; }
grep -i 'warning' "$STAGE/log" >&2 || true
echo "$DEB"
