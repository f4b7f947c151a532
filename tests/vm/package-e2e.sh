#!/bin/bash
# vm-seconds: 60 (no guest boots: a chroot; expected time on the CI machine, warm cache)
# Scenario package-e2e: livemirror's Debian package, installed, upgraded, removed and purged with
# dpkg in a Debian 12 root (the rig's cached debootstrap tree), as its users would.
#   host: two versions built from the tree around the binary under test (scripts/build-deb.sh):
#     the package itself ($LIVEMIRROR_DEB, which scripts/test-all.sh builds, or one built here)
#     and an older one, VERSION~lmtest1, built twice: both builds must be the same bytes. Control
#     fields, Depends covering every library the binary loads, the exact file list (binary,
#     installer, glue where initramfs-tools and dracut look, unit, man pages, completions, docs),
#     modes and owners, the conffile, a stripped binary; every man page renders without a
#     warning and `man` finds the pages by name in the package's tree.
#   chroot (a copy of the cached root): dpkg -i of the older version: the binary and the
#     installer run there, and nothing but the package's own files appeared (no initramfs, no
#     other file changed: it regenerates nothing), postinst says what to run; the administrator
#     edits the conffile and the installer leaves its log; dpkg -i of the package (a real
#     upgrade): the edit is kept, no .dpkg-* files, postinst names the old version; dpkg -r:
#     only the configuration (and the installer's log) stays; dpkg -P: the tree is exactly what
#     it was before.
# Usage: LIVEMIRROR_BIN=path/to/livemirror [LIVEMIRROR_DEB=path/to/livemirror.deb] tests/vm/package-e2e.sh
# Needs root (chroot), cargo-deb and dpkg-dev (scripts/build-deb.sh), man-db.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NAME=package-e2e
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
REPO=$(cd "$LM_DIR/../.." && pwd)
[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
[ "$(id -u)" = 0 ] || lm_die "$NAME needs root (chroot)"
lm_need dpkg-deb:dpkg dpkg-shlibdeps:dpkg-dev man:man-db readelf:binutils sha256sum:coreutils \
  || lm_die "host tools missing (see above)"
lm_phase "prepare: Debian root (debootstrap, cached)"
lm_lock_cache
lm_fetch_rootfs || { lm_unlock_cache; lm_die "cannot build the Debian root (see above)"; }
lm_unlock_cache
lm_phase_end
lm_outdir "$NAME"
O=$LM_OUT
lm_say "$NAME: binary $BIN, Debian root $LM_ROOTFS, output $O"

# ------------------------------------------------------------------ the two versions
lm_phase "build: the package and an older version (scripts/build-deb.sh)"
lm_livemirror_deb "$BIN" "$O/new" || lm_die "building the package failed"
NEW=$LM_LIVEMIRROR_DEB
NEWV=$(dpkg-deb -f "$NEW" Version)
OLDV="$NEWV~lmtest1"
lm_livemirror_deb "$BIN" "$O/old" "$OLDV" || lm_die "building the older version failed"
OLD=$LM_LIVEMIRROR_DEB
lm_livemirror_deb "$BIN" "$O/old-again" "$OLDV" || lm_die "building the older version again failed"
lm_say "package $NEW ($NEWV, $(du -k "$NEW" | cut -f1) KiB); older version $OLDV"
dpkg --compare-versions "$OLDV" lt "$NEWV" && lm_ok "$OLDV is older than $NEWV" || lm_fail "$OLDV does not sort before $NEWV"
if cmp -s "$OLD" "$LM_LIVEMIRROR_DEB"; then
  lm_ok "the same tree and binary build the same package, byte for byte (reproducible)"
else
  lm_fail "two builds of $OLDV differ: $(sha256sum "$OLD" "$LM_LIVEMIRROR_DEB" | cut -c1-16 | tr '\n' ' ')"
fi
lm_phase_end

# ------------------------------------------------------------------ host: what the package holds
lm_phase "host: control fields, files, modes, man pages"
[ "$(dpkg-deb -f "$NEW" Package)" = livemirror ] && lm_ok "Package: livemirror" || lm_fail "Package: $(dpkg-deb -f "$NEW" Package)"
[ "$(dpkg-deb -f "$NEW" Architecture)" = "$(dpkg --print-architecture)" ] \
  && lm_ok "Architecture: $(dpkg --print-architecture)" || lm_fail "Architecture: $(dpkg-deb -f "$NEW" Architecture)"
for f in Maintainer Description Section Priority; do
  [ -n "$(dpkg-deb -f "$NEW" "$f")" ] && lm_ok "control field $f is set" || lm_fail "no $f in the control file"
done
# Depends must name the package of every library the binary loads (dpkg-shlibdeps at work).
DEPENDS=$(dpkg-deb -f "$NEW" Depends)
for lib in $(ldd "$BIN" | awk '/=> \//{print $3}'); do
  # (dpkg knows a library by the path its package ships: /lib or /usr/lib on a merged /usr)
  real=$(readlink -f "$lib") pkg=
  for cand in "$lib" "$real" "${real#/usr}"; do
    pkg=$(dpkg -S "$cand" 2>/dev/null | head -n 1 | cut -d: -f1) && [ -n "$pkg" ] && break
  done
  [ -n "$pkg" ] || { lm_fail "no package owns $lib, which the binary loads"; continue; }
  # (libgcc-s1 is Priority: required, on every Debian system; cargo-deb leaves it out on purpose)
  [ "$pkg" = libgcc-s1 ] && continue
  [[ ", $DEPENDS" == *", $pkg "* || ", $DEPENDS" == *", $pkg" || ", $DEPENDS" == *", $pkg,"* ]] \
    && lm_ok "Depends names $pkg (for $(basename "$lib"))" || lm_fail "Depends ($DEPENDS) lacks $pkg, which holds $lib"
done

# The exact file list: nothing missing, nothing unexpected.
X=$O/contents
dpkg-deb -x "$NEW" "$X"
dpkg-deb -c "$NEW" | awk '$1 !~ /^d/ {print $1, $2, $6}' | sort -k3 > "$O/files.list"
"$BIN" generate man "$O/generated-man" > /dev/null
{
  echo ./etc/livemirror/initrd.conf
  echo ./usr/sbin/livemirror
  echo ./usr/sbin/livemirror-install
  echo ./usr/lib/livemirror/initrd.sh
  echo ./usr/lib/livemirror/shutdown
  for f in "$REPO"/initrd-glue/lib/install-*.sh; do echo "./usr/lib/livemirror/$(basename "$f")"; done
  echo ./usr/share/initramfs-tools/hooks/livemirror
  echo ./usr/share/initramfs-tools/scripts/local-top/livemirror
  echo ./usr/share/initramfs-tools/scripts/init-bottom/livemirror
  for f in "$REPO"/initrd-glue/dracut/90livemirror/*.sh; do echo "./usr/lib/dracut/modules.d/90livemirror/$(basename "$f")"; done
  echo ./usr/lib/systemd/system/livemirror@.service
  for f in "$O"/generated-man/*.1; do echo "./usr/share/man/man1/$(basename "$f").gz"; done
  echo ./usr/share/man/man8/livemirror-install.8.gz
  echo ./usr/share/man/man7/livemirror.cmdline.7.gz
  echo ./usr/share/man/man7/livemirror.uri.7.gz
  echo ./usr/share/bash-completion/completions/livemirror
  echo ./usr/share/zsh/vendor-completions/_livemirror
  echo ./usr/share/fish/vendor_completions.d/livemirror.fish
  echo ./usr/share/doc/livemirror/README.md
  echo ./usr/share/doc/livemirror/initrd-glue.md
  echo ./usr/share/doc/livemirror/example.conf
  echo ./usr/share/doc/livemirror/copyright
  echo ./usr/share/doc/livemirror/changelog.Debian.gz
} | sort > "$O/expected.list"
awk '{print $3}' "$O/files.list" > "$O/actual.list"
if cmp -s "$O/expected.list" "$O/actual.list"; then
  lm_ok "the package holds exactly the $(wc -l < "$O/expected.list") expected files"
else
  lm_fail "file list differs (- expected, + in the package): $(diff "$O/expected.list" "$O/actual.list" | grep '^[<>]' | sed 's/^</-/; s/^>/+/' | tr '\n' ' ')"
fi
# Executables 0755, everything else 0644, all root's.
BADMODE=$(awk '{
  exe = ($3 ~ /^\.\/usr\/sbin\// || $3 == "./usr/lib/livemirror/shutdown" || $3 ~ /^\.\/usr\/share\/initramfs-tools\// || $3 ~ /^\.\/usr\/lib\/dracut\//)
  want = exe ? "-rwxr-xr-x" : "-rw-r--r--"
  if ($1 != want || ($2 != "root/root" && $2 != "0/0")) print $3 " is " $1 " " $2 " (want " want " root/root)"
}' "$O/files.list")
[ -z "$BADMODE" ] && lm_ok "executables are 0755, other files 0644, all owned by root" || lm_fail "modes: $BADMODE"
TOP=$(zcat "$X/usr/share/doc/livemirror/changelog.Debian.gz" | head -n 1)
[[ $TOP == "livemirror ($NEWV) "* ]] && lm_ok "the changelog's latest entry is $NEWV" \
  || lm_fail "the changelog's latest entry is '$TOP', the package $NEWV (add an entry to packaging/debian/changelog)"
CONFFILES=$(dpkg-deb --ctrl-tarfile "$NEW" | tar -xO ./conffiles 2>/dev/null || true)
[ "$CONFFILES" = /etc/livemirror/initrd.conf ] && lm_ok "the one conffile is /etc/livemirror/initrd.conf" \
  || lm_fail "conffiles: '$CONFFILES'"
for s in postinst postrm; do
  dpkg-deb --ctrl-tarfile "$NEW" | tar -t | grep -qx "./$s" && lm_ok "maintainer script $s is in the package" || lm_fail "no $s in the package"
done
if readelf -S "$X/usr/sbin/livemirror" | grep -qE '\.(debug_info|debug_line|symtab) '; then
  lm_fail "the packaged binary carries debug sections (not stripped)"
else
  lm_ok "the packaged binary is stripped ($(du -k "$X/usr/sbin/livemirror" | cut -f1) KiB)"
fi
# man finds every page by name in the package's tree and renders it without a warning.
NPAGES=0 BADPAGES=
for p in "$X"/usr/share/man/man*/*.gz; do
  page=$(basename "$p" .gz) sec=${page##*.} page=${page%.*}
  # (by its name alone, as `man livemirror.cmdline` looks for it)
  found=$(man -M "$X/usr/share/man" -w "$page" 2>/dev/null || true)
  warn=$(MANWIDTH=80 man -M "$X/usr/share/man" --warnings=w -E UTF-8 "$sec" "$page" 2>&1 > /dev/null || true)
  if [ "$found" = "$p" ] && [ -z "$warn" ]; then NPAGES=$((NPAGES + 1)); else BADPAGES="$BADPAGES $page($sec): ${found:-not found} ${warn}"; fi
done
[ -z "$BADPAGES" ] && [ "$NPAGES" -ge 19 ] && lm_ok "man finds and renders all $NPAGES pages by name, without warnings" \
  || lm_fail "man pages:$BADPAGES"
lm_phase_end

# ------------------------------------------------------------------ chroot: install, upgrade, remove, purge
lm_phase "chroot: install $OLDV, upgrade to $NEWV, remove, purge"
T=$O/root
cp -a "$LM_ROOTFS" "$T"
# manifest FILE: every path of the tree with its type, mode and owner, a link's target, a file's
# size and sha256; dpkg's own records and logs left out (they are meant to change).
manifest() {
  local prune=(\( -path ./var/lib/dpkg -o -path ./var/log/dpkg.log -o -path ./var/log/alternatives.log
               -o -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp \) -prune)
  (cd "$T" && find . -xdev "${prune[@]}" -o -type f -printf '%p f %m %u:%g %s\n' \
     -o -type l -printf '%p l %m %u:%g %l\n' -o -printf '%p %y %m %u:%g\n') | sort > "$1.ls"
  (cd "$T" && find . -xdev "${prune[@]}" -o -type f -print0 | xargs -0 -r sha256sum) \
    | awk '{print $2, $1}' | sort > "$1.sum"
  join -a 1 "$1.ls" "$1.sum" > "$1"
}
# added A B: paths in manifest B that A lacks; changed A B: paths in both whose line differs.
added() { comm -13 <(cut -d' ' -f1 "$1") <(cut -d' ' -f1 "$2"); }
changed() { comm -12 <(cut -d' ' -f1 "$1") <(cut -d' ' -f1 "$2") > "$O/common"; comm -13 "$1" "$2" | cut -d' ' -f1 | grep -Fxf "$O/common" || true; }
dpkg_in() { chroot "$T" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg "$@"; }
status() { dpkg_in -s livemirror 2>/dev/null | sed -n 's/^Status: //p'; }
manifest "$O/m0"

# 1. install the older version
if lm_install_deb "$T" "$OLD" > "$O/install.log" 2>&1; then lm_ok "dpkg -i $OLDV"; else lm_fail "dpkg -i $OLDV: $(tail -n 5 "$O/install.log" | tr '\n' ' ')"; fi
[ "$(status)" = "install ok installed" ] && lm_ok "dpkg: livemirror $OLDV installed" || lm_fail "dpkg status after install: $(status)"
grep -q 'nothing was regenerated' "$O/install.log" && grep -q 'update-initramfs -u' "$O/install.log" \
  && lm_ok "postinst says nothing was regenerated and what to run" || lm_fail "postinst message missing: $(tr '\n' ' ' < "$O/install.log")"
manifest "$O/m1"
dpkg_in -L livemirror | sed 's|^/|./|; s|^\./\.$|.|' | sort > "$O/owned"
NEWPATHS=$(added "$O/m0" "$O/m1" | grep -vFxf "$O/owned" || true)
[ -z "$NEWPATHS" ] && lm_ok "install added only the package's own files ($(added "$O/m0" "$O/m1" | wc -l) paths)" \
  || lm_fail "install created files the package does not own: $(echo "$NEWPATHS" | tr '\n' ' ')"
MISSING=$(comm -23 <(grep -vx '\.' "$O/owned") <(cut -d' ' -f1 "$O/m1") || true)
[ -z "$MISSING" ] && lm_ok "every file dpkg lists is in the tree" || lm_fail "dpkg lists files that are not there: $MISSING"
CHANGED=$(changed "$O/m0" "$O/m1")
[ -z "$CHANGED" ] && lm_ok "install changed no file outside the package (no initramfs, no /etc: regenerates nothing)" \
  || lm_fail "install changed files it does not own: $(echo "$CHANGED" | tr '\n' ' ')"
V=$(chroot "$T" /usr/sbin/livemirror --version 2>&1) && lm_ok "the installed binary runs in Debian 12: $V" || lm_fail "livemirror --version in the chroot: $V"
chroot "$T" /usr/sbin/livemirror-install --help > /dev/null 2>&1 && lm_ok "livemirror-install --help runs in the chroot" \
  || lm_fail "livemirror-install --help failed in the chroot"

# The administrator's edit, and what livemirror-install leaves on an installed system.
echo 'LIVEMIRROR_WAIT=90   # lmtest: an edit of the administrator' >> "$T/etc/livemirror/initrd.conf"
echo "lmtest: livemirror-install's log" > "$T/var/log/livemirror-install.log"
manifest "$O/m1b"

# 2. upgrade
if lm_install_deb "$T" "$NEW" > "$O/upgrade.log" 2>&1; then lm_ok "dpkg -i $NEWV over $OLDV"; else lm_fail "upgrade: $(tail -n 5 "$O/upgrade.log" | tr '\n' ' ')"; fi
V=$(dpkg_in -s livemirror 2>/dev/null | sed -n 's/^Version: //p')
[ "$V" = "$NEWV" ] && [ "$(status)" = "install ok installed" ] && lm_ok "dpkg: livemirror $NEWV installed" || lm_fail "after the upgrade: version $V, status $(status)"
grep -q "upgraded from $OLDV" "$O/upgrade.log" && lm_ok "postinst knows it upgraded from $OLDV" || lm_fail "postinst on upgrade: $(tr '\n' ' ' < "$O/upgrade.log")"
grep -q 'lmtest: an edit of the administrator' "$T/etc/livemirror/initrd.conf" && lm_ok "the upgrade kept the edited conffile" \
  || lm_fail "the upgrade lost the edit of /etc/livemirror/initrd.conf"
LEFT=$(find "$T/etc" "$T/usr" -name '*.dpkg-*' 2>/dev/null)
[ -z "$LEFT" ] && lm_ok "no .dpkg-new/.dpkg-old/.dpkg-dist files after the upgrade" || lm_fail "left by the upgrade: $LEFT"
manifest "$O/m2"
CHANGED=$(changed "$O/m1b" "$O/m2" | grep -vFxf "$O/owned" || true)
[ -z "$CHANGED" ] && lm_ok "the upgrade changed nothing outside the package" || lm_fail "the upgrade changed: $(echo "$CHANGED" | tr '\n' ' ')"

# 3. remove: the configuration stays (and the log, which policy removes at purge)
if dpkg_in -r livemirror > "$O/remove.log" 2>&1; then lm_ok "dpkg -r livemirror"; else lm_fail "dpkg -r: $(tail -n 5 "$O/remove.log" | tr '\n' ' ')"; fi
[ "$(status)" = "deinstall ok config-files" ] && lm_ok "dpkg: only the configuration files remain registered" || lm_fail "status after remove: $(status)"
grep -q 'removed; nothing was regenerated' "$O/remove.log" && lm_ok "postrm says what stays until the initramfs is rebuilt" \
  || lm_fail "postrm message missing: $(tr '\n' ' ' < "$O/remove.log")"
manifest "$O/m3"
LEFT=$(added "$O/m0" "$O/m3" | tr '\n' ' ')
[ "$LEFT" = "./etc/livemirror ./etc/livemirror/initrd.conf ./var/log/livemirror-install.log " ] \
  && lm_ok "after remove only the configuration (and the installer's log) is left: $LEFT" || lm_fail "left after remove: $LEFT"
grep -q 'lmtest: an edit' "$T/etc/livemirror/initrd.conf" && lm_ok "remove kept the edited configuration" || lm_fail "remove lost the configuration"
CHANGED=$(changed "$O/m0" "$O/m3")
[ -z "$CHANGED" ] && lm_ok "remove changed nothing that was there before" || lm_fail "changed after remove: $(echo "$CHANGED" | tr '\n' ' ')"

# 4. purge: nothing left
if dpkg_in -P livemirror > "$O/purge.log" 2>&1; then lm_ok "dpkg -P livemirror"; else lm_fail "dpkg -P: $(tail -n 5 "$O/purge.log" | tr '\n' ' ')"; fi
[ -z "$(status)" ] && lm_ok "dpkg no longer knows livemirror" || lm_fail "status after purge: $(status)"
INFO=$(ls "$T"/var/lib/dpkg/info/livemirror.* 2>/dev/null || true)
[ -z "$INFO" ] && lm_ok "no livemirror.* left in dpkg's database" || lm_fail "left in /var/lib/dpkg/info: $INFO"
manifest "$O/m4"
if cmp -s "$O/m0" "$O/m4"; then
  lm_ok "after purge the tree is exactly what it was before the install ($(wc -l < "$O/m4") paths compared)"
else
  lm_fail "after purge the tree differs: $(diff "$O/m0" "$O/m4" | grep '^[<>]' | head -n 10 | tr '\n' ' ')"
fi
rm -rf --one-file-system "$T"
lm_phase_end

lm_summary "$NAME"
