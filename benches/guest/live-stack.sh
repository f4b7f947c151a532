#!/bin/bash
# The live root's stack, measured in a QEMU guest: the same read-only ext4 image served three
# ways with the writes kept in RAM, in one boot of Debian 12's 6.1 kernel (it has dm-snapshot):
#   overlay        livemirror's own overlay: `serve --source /dev/vda --overlay FILE-ON-TMPFS
#                  --nbd-device /dev/nbdN` (no device-mapper)
#   dm-livemirror  livemirror serving dm-snapshot's live-rw, built as dracut's dmsquash-live
#                  builds it (`snapshot BASE LOOP-OVER-TMPFS-FILE PO 8`): the glue's stack before
#   dm             live-rw itself, mounted directly (the live medium without livemirror)
# Per stack, from a fresh overlay or COW each time: fio 4K random reads and 4K random writes
# (QD32, direct I/O on a file of the image's own data: what a live session reads and first
# overwrites), the wall time of `tar -x` of a package tree (the rig's live Debian tree, about
# 280 MiB in 7,000 entries) followed by `sync`, and of reading it back with `tar -c` from a cold
# cache. The stacks alternate (each repeat starts one stack later); medians over the repeats.
# The guest runs under TCG (software emulation): only ratios within one run mean anything.
# Never a timed test, not in CI. Writes benches/guest/results/live-stack.md and prints it.
#
# Usage: benches/guest/live-stack.sh [--reps N] [--secs S] [--smp N] [--mem MIB] [--fio-mb MIB]
#          [--stacks overlay,dm-livemirror,dm] [--tree DIR] [--kernel 6.1|6.12] [--no-build]
#          [--out FILE] [--render CONSOLE]
# --tree DIR: the package tree to extract (default: the live tree of live-iso-e2e, built and
# cached by lm_fetch_rootfs, which needs root and debootstrap the first time).
# --render CONSOLE: the tables again from a kept console log (console.txt of an earlier run,
# LIVEMIRROR_VM_KEEP=1), without a boot.
# Needs the VM rig's prerequisites (tests/vm/README.md) and, on the host, fio, dmsetup and GNU
# tar, which are copied into the guest with their libraries.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../../tests/vm/lib.sh
. "$ROOT/tests/vm/lib.sh"

REPS=3 SECS=10 SMP=2 MEM=2560 FIO_MB=256 STACKS=overlay,dm-livemirror,dm TREE='' KERNEL=6.1 BUILD=1
OUT=$ROOT/benches/guest/results/live-stack.md RENDER=
CMDLINE="benches/guest/live-stack.sh${*:+ $*}"
while [ $# -gt 0 ]; do
  case $1 in
    --reps) REPS=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --fio-mb) FIO_MB=$2; shift 2 ;;
    --stacks) STACKS=$2; shift 2 ;;
    --tree) TREE=$2; shift 2 ;;
    --kernel) KERNEL=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    --render) RENDER=$2; shift 2 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
# shellcheck disable=SC2034 # read by lib.sh (lm_qemu, lm_fetch_kernel)
LM_SMP=$SMP LM_MEM=$MEM LM_KSERIES=$KERNEL
T_START=$(date +%s)
if [ -n "$RENDER" ]; then
  lm_fetch_kernel >/dev/null; lm_fetch_qemu
  O=$(mktemp -d /tmp/livemirror-vm.live-stack-render.XXXXXX); cp "$RENDER" "$O/console.txt"
  [ -s "$(dirname "$RENDER")/command.txt" ] && CMDLINE=$(cat "$(dirname "$RENDER")/command.txt")
  TREE_INFO=$(cat "$(dirname "$RENDER")/tree.txt" 2>/dev/null || echo "(not kept)")
else
lm_need fio:fio dmsetup:dmsetup tar:tar || exit 1
if [ "$BUILD" = 1 ]; then (cd "$ROOT" && cargo build --release -q); fi
BIN=${LIVEMIRROR_BIN:-$ROOT/target/release/livemirror}
[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN"
lm_prepare || exit 1
if [ -z "$TREE" ]; then
  lm_phase "prepare: the package tree (the live tree of live-iso-e2e; cached)"
  lm_lock_cache
  lm_fetch_rootfs "live-hybrid-$LM_SUITE" "$LM_LIVE_INCLUDE" "$LM_LIVE_APT" || { lm_unlock_cache; lm_die "cannot build the live tree (see above), or give --tree DIR"; }
  lm_unlock_cache
  TREE=$LM_ROOTFS
  lm_phase_end
fi
[ -d "$TREE" ] || lm_die "--tree $TREE: not a directory"
lm_outdir live-stack
O=$LM_OUT
echo "$CMDLINE" > "$O/command.txt"

lm_phase "build: the image (ext4 with fio's file), the tree's archive, tools disk, initramfs"
# The archive is a disk of its own, read once into the guest's RAM; tar records are 10 KiB, so
# it is a whole number of sectors as it is.
tar -c --numeric-owner -f "$O/tree.tar" -C "$TREE" .
ENTRIES=$(tar -t -f "$O/tree.tar" | wc -l)
TREE_MB=$(( $(stat -c %s "$O/tree.tar") >> 20 ))
TREE_INFO="$TREE ($TREE_MB MiB as an archive, $ENTRIES entries; $(find "$TREE" -type f | wc -l) files)"
echo "$TREE_INFO" > "$O/tree.txt"
mkdir -p "$O/image-tree"
head -c "$((FIO_MB << 20))" /dev/urandom > "$O/image-tree/fio.dat"
# Room for the tree twice over (ext4's blocks and inodes for small files) besides fio's file.
IMG_MB=$((FIO_MB + 2 * TREE_MB + 256))
lm_ext4 "$O/image-tree" "$O/image.img" "${IMG_MB}M" -L lmlive
rm -rf "$O/image-tree"
lm_strip "$BIN" "$O/livemirror-bin"
mkdir -p "$O/bin"; ln -sf "$O/livemirror-bin" "$O/bin/livemirror"
PATH=$O/bin:$PATH lm_tools_image "$O/tools.img" fio livemirror dmsetup tar || lm_die "the tools disk"
R=$O/initramfs
mkdir -p "$R"/{dev,proc,sys,run,tmp,etc}
lm_busybox "$R"
install -m755 "$ROOT/benches/guest/live-stack-guest.sh" "$R/init"
lm_install_modules "$R" virtio_pci virtio_blk nbd dm-snapshot loop ext4 || lm_die "kernel modules"
lm_initramfs "$R" "$O/initrd.gz"
lm_say "image $IMG_MB MiB (fio.dat $FIO_MB MiB), $TREE_INFO"
lm_phase_end

NS=$(tr ',' '\n' <<< "$STACKS" | grep -c .)
TMO=$(( REPS * NS * (2 * SECS + 400) + 300 ))
lm_phase "boot: $NS stacks x $REPS repeats (host timeout ${TMO} s)"
set +e
# The image and the archive through the host's page cache (QEMU's default): a live medium's
# image is read from RAM or a fast medium, and a host disk busy with other work would only add
# noise to the reads of every stack alike.
lm_boot "$O/console.log" "$TMO" "$O/initrd.gz" \
  "lmb.stacks=$STACKS lmb.reps=$REPS lmb.secs=$SECS lmb.entries=$ENTRIES" \
  -drive "file=$O/image.img,if=virtio,format=raw,readonly=on" \
  -drive "file=$O/tools.img,if=virtio,format=raw,readonly=on" \
  -drive "file=$O/tree.tar,if=virtio,format=raw,readonly=on"
RC=$?
set -e
lm_phase_end
tr -d '\r' < "$O/console.log" > "$O/console.txt"
fi
grep -aq 'LMBENCH done' "$O/console.txt" || { grep -a 'LMBENCH' "$O/console.txt" | tail -n 20; lm_die "the guest did not finish (QEMU exited ${RC:-?}; console: $O/console.txt)"; }
if grep -aq 'LMBENCH fail' "$O/console.txt"; then grep -a 'LMBENCH fail\|LMBENCH log\|LMBENCH dmesg' "$O/console.txt"; lm_die "the guest reported a failure"; fi

INFO=$(sed -n 's/.*LMBENCH info \(.*\) \[t=.*/\1/p' "$O/console.txt")
grep -a 'LMBENCH row ' "$O/console.txt" | sed 's/.*LMBENCH row //' > "$O/rows.txt"
grep -a 'LMBENCH ram ' "$O/console.txt" | sed 's/.*LMBENCH ram //' > "$O/ram.txt"
if grep -q 'err=[1-9]' "$O/rows.txt"; then grep -a 'LMBENCH fio' "$O/console.txt"; lm_die "fio reported errors"; fi
mkdir -p "$(dirname "$OUT")"
{
  echo "### The live stack in a guest: livemirror's overlay against dm-snapshot (\`benches/guest/live-stack.sh\`)"
  echo
  echo "- Date (UTC): $(date -u '+%Y-%m-%d %H:%M'); run took $(( ($(date +%s) - T_START + 30) / 60 )) min; host load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Command: \`$CMDLINE\`"
  echo "- Host: $(nproc) cores, $(uname -r); guest: QEMU $("${LM_QEMU[@]}" --version | head -n 1 | awk '{print $4}') under **TCG (software emulation, no KVM)**, -smp $SMP, ${MEM} MiB, kernel $LM_KVER"
  echo "$INFO" | sed -n 's/^versions: /- Guest tools: /p' | sed 's|/tools/bin/||g'
  echo "- The image: ext4 (made by \`mke2fs -d\`), read-only virtio disk through the host's page cache, holding \`fio.dat\` (random data) and free space; the package tree: $TREE_INFO, read from a copy in the guest's RAM."
  echo "- Stacks, each built afresh for every measurement, writes in RAM (tmpfs): **overlay** \`livemirror serve --source /dev/vda --overlay /run/lm/overlay --nbd-device /dev/nbdN\`; **dm-livemirror** \`livemirror serve --source /dev/mapper/live-rw --nbd-device /dev/nbdN\` over \`snapshot /dev/vda LOOP PO 8\` (the COW a loop device over a sparse 32 GiB tmpfs file, as dracut's dmsquash-live makes \`live-rw\`); **dm** that \`live-rw\` mounted directly. livemirror with its defaults (one kernel connection per CPU, O_DIRECT on block devices, the overlay file in RAM through the page cache)."
  echo "- Each: \`drop_caches\`, fio \`--direct=1 --ioengine=libaio --bs=4k\` QD32 (one job per CPU on its own part of the file, ${SECS} s) on \`/mnt/fio.dat\`: random reads (all of the image's data), then random writes (first writes of the image's blocks); then \`tar -x\` of the tree and \`sync\` (wall time of both); then, from a cold cache, \`tar -c\` of the extracted tree to a pipe (reads of what the overlay or COW holds). The order of the stacks turns by one each repeat; cells are medians of $(awk -F'rep=' '{split($2, a, " "); if (a[1] > m) m = a[1]} END {print m + 0}' "$O/rows.txt") repeats."
  echo "- **Only ratios within this run mean anything**: the guest, the daemon and the kernel's block layers all run on emulated CPUs sharing the host's cores with other work."
  echo
  awk -v stacks="$STACKS" '
    function kv(s, k,   n, a, i) { n = split(s, a, " "); for (i = 1; i <= n; i++) if (index(a[i], k "=") == 1) return substr(a[i], length(k) + 2); return "" }
    function med(list,   n, a, i, j, t) { n = split(list, a, " "); if (n == 0) return -1
                                          for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
                                          return (n % 2) ? a[(n + 1) / 2] + 0 : (a[n / 2] + a[n / 2 + 1]) / 2 }
    function add(arr, key, v) { arr[key] = (key in arr) ? arr[key] " " v : v }
    function timed(p) { return p == "untar" || p == "readback" }
    function fmtk(x) { return (x < 0) ? "—" : sprintf(x >= 1000 ? "%.2fk" : "%.0f", x >= 1000 ? x / 1000 : x) }
    function speed(p, v) { return timed(p) ? ((v > 0) ? 1 / v : 0) : v }
    function cell(arr, key, f) { return (key in arr) ? sprintf(f, med(arr[key])) : "—" }
    FILENAME ~ /ram/ { add(ram, kv($0, "stack"), kv($0, "kib")); next }
    { s = kv($0, "stack"); p = kv($0, "phase"); r = kv($0, "rep") + 0
      v = timed(p) ? kv($0, "secs") + 0 : kv($0, "iops") + 0
      add(val, s SUBSEP p, v); per[s, p, r] = v
      c = kv($0, "cpu_ms"); g = kv($0, "gcpu_ms") + 0
      req = kv($0, "rd") + kv($0, "wr") + kv($0, "fl")
      if (c != "-") add(cpu, s SUBSEP p, timed(p) ? c / 1000 : c * 1000 / (kv($0, "iops") * kv($0, "secs") + 1e-9))
      add(gcpu, s SUBSEP p, timed(p) ? g / 1000 : g * 1000 / (kv($0, "iops") * kv($0, "secs") + 1e-9))
      if (c != "-" && req > 0) add(cpureq, s SUBSEP p, c * 1000 / req)
      if (kv($0, "idle_ms") != "") add(idle, s SUBSEP p, kv($0, "idle_ms") / 1000)
      if (kv($0, "rd") != "") { add(nrd, s SUBSEP p, kv($0, "rd")); add(nwr, s SUBSEP p, kv($0, "wr")); add(nfl, s SUBSEP p, kv($0, "fl"))
                                if (req > 0) add(rsz, s SUBSEP p, (kv($0, "rd_kib") + kv($0, "wr_kib")) / (kv($0, "rd") + kv($0, "wr") + 1e-9)) }
      if (r > reps) reps = r }
    END {
      ns = split(stacks, S, ",")
      np = split("randread randwrite untar readback", P, " ")
      name["randread"] = "4K randread QD32 (IOPS)"; name["randwrite"] = "4K randwrite QD32 (IOPS)"
      name["untar"] = "tar -x + sync (s)"; name["readback"] = "tar -c, cold cache (s)"
      hdr = "| |"; sep = "| --- |"
      for (i = 1; i <= ns; i++) { hdr = hdr " " S[i] " |"; sep = sep " ---: |" }
      shdr = hdr; ssep = sep
      hasov = 0; for (i = 1; i <= ns; i++) if (S[i] == "overlay") hasov = 1
      if (hasov) for (i = 1; i <= ns; i++) if (S[i] != "overlay") { hdr = hdr " overlay / " S[i] " |"; sep = sep " ---: |" }
      if (hasov) for (i = 1; i <= ns; i++) if (S[i] != "overlay") { hdr = hdr " per repeat, overlay / " S[i] " |"; sep = sep " --- |" }
      print "Medians of " reps " repeats. The ratios are speeds, overlay against the other stack (IOPS over IOPS; time over time the other way round): above 1.00x the overlay is faster."
      print ""; print hdr; print sep
      for (k = 1; k <= np; k++) {
        p = P[k]; line = "| " name[p] " |"
        for (i = 1; i <= ns; i++) { m = med(val[S[i], p]); line = line " " (timed(p) ? sprintf("%.1f", m) : fmtk(m)) " |" }
        if (hasov) {
          o = speed(p, med(val["overlay", p]))
          for (i = 1; i <= ns; i++) if (S[i] != "overlay") { x = speed(p, med(val[S[i], p])); line = line " **" ((o > 0 && x > 0) ? sprintf("%.2fx", o / x) : "—") "** |" }
          for (i = 1; i <= ns; i++) if (S[i] != "overlay") {
            l = ""
            for (r = 1; r <= reps; r++) { o = speed(p, per["overlay", p, r]); x = speed(p, per[S[i], p, r]); l = l ((l == "") ? "" : " ") ((o > 0 && x > 0) ? sprintf("%.2f", o / x) : "—") }
            line = line " " l " |"
          }
        }
        print line
      }
      line = "| RAM held by the overlay or COW file at the end (MiB) |"
      for (i = 1; i <= ns; i++) { m = med(ram[S[i]]); line = line " " ((m < 0) ? "—" : sprintf("%.0f", m / 1024)) " |" }
      print line
      print ""
      print "CPU time, medians, in emulated-CPU µs per request (fio rows) or s per run (tar rows): the stack'"'"'s livemirror daemon (all its threads) / the whole guest (fio or tar, the kernel, the daemons); then the daemon'"'"'s µs per request the kernel completed on the mounted device:"
      print ""; print shdr; print ssep
      for (k = 1; k <= np; k++) {
        p = P[k]; line = "| " name[p] " |"; f = timed(p) ? "%.1f" : "%.0f"
        for (i = 1; i <= ns; i++) line = line " " cell(cpu, S[i] SUBSEP p, f) " / " cell(gcpu, S[i] SUBSEP p, f) "; " cell(cpureq, S[i] SUBSEP p, "%.0f") " µs |"
        print line
      }
      print ""
      print "Requests the kernel completed on the mounted device (medians: reads / writes / flushes, and their mean size in KiB), and the CPU seconds the other stacks'"'"' idle daemons took meanwhile:"
      print ""; print shdr; print ssep
      for (k = 1; k <= np; k++) {
        p = P[k]; line = "| " name[p] " |"
        for (i = 1; i <= ns; i++) line = line " " cell(nrd, S[i] SUBSEP p, "%.0f") " / " cell(nwr, S[i] SUBSEP p, "%.0f") " / " cell(nfl, S[i] SUBSEP p, "%.0f") ", " cell(rsz, S[i] SUBSEP p, "%.1f") " KiB; idle " cell(idle, S[i] SUBSEP p, "%.2f") " s |"
        print line
      }
    }' "$O/rows.txt" "$O/ram.txt"
} > "$OUT"
cat "$OUT"
lm_say "written to $OUT (console: $O/console.txt)"
[ -n "${LIVEMIRROR_VM_KEEP:-}" ] || [ -n "${LIVEMIRROR_VM_OUT:-}" ] || rm -rf "$O"
