#!/bin/bash
# The kernel path, measured: fio inside a QEMU guest on /dev/nbdN, with livemirror (its own
# netlink attach), nbd-server + nbd-client and qemu-nbd + nbd-client serving the same virtio disk
# of the guest, each with 1, 2 and 4 kernel connections, and on /dev/ublkbN with livemirror's
# ublk door (one queue per guest CPU; the 6.12 kernel, the default here, has ublk_drv); the CPU
# time per request of the serving process and of the whole guest; then the copy rate of a
# livemirror sync inside the guest while fio writes. All in one boot, one run: the guest runs under TCG (software
# emulation), so absolute numbers mean nothing and only ratios within one run do.
# Never a timed test, not in CI. Writes benches/guest/results/latest.md and prints it.
#
# Usage: benches/guest/run.sh [--secs S] [--smp N] [--mem MIB] [--disk-mb MIB] [--conns 1,2,4]
#          [--servers livemirror,ublk,nbd-server,qemu-nbd] [--workloads randread4k,randwrite4k,read1m,write1m]
#          (also randread4kqd128: 4K random reads at QD128, for the ublk queue depth)
#          [--kernel 6.12|6.1] [--ublk-depth N] [--no-sync] [--no-build] [--out FILE] [--render CONSOLE]
# Servers: livemirror (over NBD), ublk (livemirror's ublk door), ublk-hop (the same with every
# request carried out on another engine thread: the measurement behind docs/decisions.md, ublk),
# nbd-server, qemu-nbd. --kernel 6.1 (Debian 12's own kernel, no ublk_drv) leaves ublk out.
# --render CONSOLE makes the tables again from a kept console log (console.txt of an earlier run,
# LIVEMIRROR_VM_KEEP=1), without a boot; give the same --conns/--servers/--workloads.
# Needs the VM rig's prerequisites (tests/vm/README.md) and, on the host, fio, nbd-server,
# qemu-nbd and nbd-client, which are copied into the guest with their libraries.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../../tests/vm/lib.sh
. "$ROOT/tests/vm/lib.sh"

SECS=10 SMP=4 MEM=1024 DISK_MB=1024 CONNS=1,2,4 SERVERS=livemirror,ublk,nbd-server,qemu-nbd KERNEL=6.12 UDEPTH=128
WORKLOADS=randread4k,randwrite4k,read1m,write1m SYNC=1 BUILD=1 OUT=$ROOT/benches/guest/results/latest.md RENDER=
CMDLINE="benches/guest/run.sh${*:+ $*}"
while [ $# -gt 0 ]; do
  case $1 in
    --secs) SECS=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --disk-mb) DISK_MB=$2; shift 2 ;;
    --conns) CONNS=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --kernel) KERNEL=$2; shift 2 ;;
    --ublk-depth) UDEPTH=$2; shift 2 ;;
    --no-sync) SYNC=0; shift ;;
    --no-build) BUILD=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    --render) RENDER=$2; shift 2 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
# shellcheck disable=SC2034 # read by lib.sh's lm_qemu
LM_SMP=$SMP LM_MEM=$MEM LM_KSERIES=$KERNEL
if [ "$KERNEL" = 6.1 ]; then SERVERS=$(tr ',' '\n' <<< "$SERVERS" | grep -v '^ublk' | paste -sd,); fi
T_START=$(date +%s)
if [ -n "$RENDER" ]; then
  lm_fetch_kernel >/dev/null; lm_fetch_qemu
  O=$(mktemp -d /tmp/livemirror-vm.guest-bench-render.XXXXXX); cp "$RENDER" "$O/console.txt"
  [ -s "$(dirname "$RENDER")/command.txt" ] && CMDLINE=$(cat "$(dirname "$RENDER")/command.txt")
else
lm_need fio:fio nbd-server:nbd-server qemu-nbd:qemu-utils nbd-client:nbd-client || exit 1
if [ "$BUILD" = 1 ]; then (cd "$ROOT" && cargo build --release -q); fi
BIN=${LIVEMIRROR_BIN:-$ROOT/target/release/livemirror}
[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN"
lm_prepare || exit 1
lm_outdir guest-bench
O=$LM_OUT
echo "$CMDLINE" > "$O/command.txt"

lm_phase "build: served disk (random), target, tools disk, initramfs"
head -c "$((DISK_MB << 20))" /dev/urandom > "$O/vda.img"
rm -f "$O/vdb.img"; truncate -s "${DISK_MB}M" "$O/vdb.img"
lm_strip "$BIN" "$O/livemirror-bin"
mkdir -p "$O/bin"; ln -sf "$O/livemirror-bin" "$O/bin/livemirror"
PATH=$O/bin:$PATH lm_tools_image "$O/vdc.img" fio nbd-server qemu-nbd nbd-client livemirror || lm_die "the tools disk"
R=$O/initramfs
mkdir -p "$R"/{dev,proc,sys,run,tmp,etc}
lm_busybox "$R"
install -m755 "$ROOT/benches/guest/guest.sh" "$R/init"
UBLK_MOD=; [[ ",$SERVERS," == *,ublk* ]] && UBLK_MOD=ublk_drv
# shellcheck disable=SC2086
lm_install_modules "$R" virtio_pci virtio_blk nbd $UBLK_MOD || lm_die "kernel modules"
lm_initramfs "$R" "$O/initrd.gz"
lm_phase_end

NS=$(tr ',' '\n' <<< "$SERVERS" | grep -vc '^ublk') NU=$(tr ',' '\n' <<< "$SERVERS" | grep -c '^ublk' || true)
NC=$(tr ',' '\n' <<< "$CONNS" | grep -c .) NW=$(tr ',' '\n' <<< "$WORKLOADS" | grep -c .)
TMO=$(( ((NS * NC + NU) * (NW * (SECS + 4) + 8) + SYNC * NC * (SECS + 15)) * 2 + 180 ))
lm_phase "boot: $NS NBD servers x $NC connection counts + $NU ublk x $NW workloads, ${SECS} s each (host timeout ${TMO} s)"
set +e
lm_boot "$O/console.log" "$TMO" "$O/initrd.gz" \
  "lmb.secs=$SECS lmb.conns=$CONNS lmb.servers=$SERVERS lmb.workloads=$WORKLOADS lmb.sync=$SYNC lmb.ublkdepth=$UDEPTH" \
  -drive "file=$O/vda.img,if=virtio,format=raw,cache=none" \
  -drive "file=$O/vdb.img,if=virtio,format=raw,cache=none" \
  -drive "file=$O/vdc.img,if=virtio,format=raw,readonly=on"
RC=$?
set -e
lm_phase_end
tr -d '\r' < "$O/console.log" > "$O/console.txt"
fi
grep -aq 'LMBENCH done' "$O/console.txt" || { grep -a 'LMBENCH' "$O/console.txt" | tail -n 20; lm_die "the guest did not finish (QEMU exited $RC; console: $O/console.txt)"; }
if grep -aq 'LMBENCH fail' "$O/console.txt"; then grep -a 'LMBENCH fail' "$O/console.txt"; lm_die "the guest reported a failure"; fi

# ---- the tables
INFO=$(sed -n 's/.*LMBENCH info \(.*\) \[t=.*/\1/p' "$O/console.txt")
grep -a '^LMBENCH row \|LMBENCH row ' "$O/console.txt" | sed 's/.*LMBENCH row //' > "$O/rows.txt"
grep -a 'LMBENCH sync ' "$O/console.txt" | sed 's/.*LMBENCH sync //' > "$O/sync.txt" || true
mkdir -p "$(dirname "$OUT")"
{
  echo "### Kernel path: fio in a QEMU guest on /dev/nbdN (\`benches/guest/run.sh\`)"
  echo
  echo "- Date (UTC): $(date -u '+%Y-%m-%d %H:%M'); run took $(( ($(date +%s) - T_START + 30) / 60 )) min"
  echo "- Command: \`$CMDLINE\`"
  echo "- Host: $(nproc) cores, $(uname -r); guest: QEMU $("${LM_QEMU[@]}" --version | head -n 1 | awk '{print $4}') under **TCG (software emulation, no KVM)**, -smp $SMP, ${MEM} MiB, kernel $LM_KVER"
  echo "$INFO" | sed -n 's/^versions: /- Guest tools: /p' | sed 's/This is //; s|/tools/bin/||g'
  echo "- Served disk: a ${DISK_MB} MiB virtio disk of random data (host file, \`cache=none\`), the same for every server, over Unix sockets: livemirror \`serve --source /dev/vda --nbd-device /dev/nbdN --nbd-connections C\` (its own netlink attach, O_DIRECT), \`nbd-server\` (unixsock, flush + fua; reads through the guest's page cache: it has no O_DIRECT) + \`nbd-client -unix -C C\`, \`qemu-nbd -t -e 8 --cache=none --aio=io_uring\` + \`nbd-client -unix -C C\`; a fresh /dev/nbdN per configuration, --nbd-timeout / -t 10 s."
  [[ ",$SERVERS," == *,ublk* ]] && echo "- livemirror ublk: \`serve --source /dev/vda --ublk-device auto --ublk-queue-depth $UDEPTH\` (one queue per guest CPU, each served on one of the daemon's I/O threads; user copy; O_DIRECT on the disk); \`ublk, hop\`: the same with \`LIVEMIRROR_UBLK_HOP=1\`, every request carried out on another I/O thread than its queue's."
  echo "- fio: \`--direct=1 --ioengine=libaio --time_based --runtime=$SECS\`, one job per guest CPU ($SMP) on its own part of the disk, the workload's queue depth spread over them (the kernel sends a request on the connection of the CPU that submitted it, so one job would use one connection)."
  echo "- **Only ratios within this run mean anything**: everything (fio, the server, the kernel's NBD client) runs on emulated CPUs sharing the host's cores."
  echo
  awk -v conns="$CONNS" -v servers="$SERVERS" -v workloads="$WORKLOADS" '
    function kv(s, k,   n, a, i) { n = split(s, a, " "); for (i = 1; i <= n; i++) if (index(a[i], k "=") == 1) return substr(a[i], length(k) + 2); return "" }
    function fmt(x) { return sprintf(x >= 1000 ? "%.1fk" : "%.0f", x >= 1000 ? x / 1000 : x) }
    function ratio(a, b) { return (a > 0 && b > 0) ? sprintf("%.2fx", a / b) : "—" }
    { s = kv($0, "server"); c = kv($0, "conns"); w = kv($0, "workload"); io[s, c, w] = kv($0, "iops") + 0; bw[s, c, w] = kv($0, "kib_s") + 0;
      er[s, c, w] = kv($0, "err"); to[s, c] += kv($0, "timeouts"); cpu[s, c, w] = kv($0, "cpu_us"); gcpu[s, c, w] = kv($0, "gcpu_us") }
    END {
      nc = split(conns, C, ","); ns = split(servers, S, ","); nw = split(workloads, W, ",")
      name["randread4k"] = "4K randread QD32"; name["randwrite4k"] = "4K randwrite QD32"; name["randread4kqd128"] = "4K randread QD128"; name["read1m"] = "1M seqread QD8"; name["write1m"] = "1M seqwrite QD8"
      label["ublk"] = "livemirror ublk"; label["ublk-hop"] = "livemirror ublk, hop"
      # The columns: a ublk server once (it has queues, not connections), the others per connection count.
      ncol = 0
      for (i = 1; i <= ns; i++) {
        if (S[i] ~ /^ublk/) { ncol++; cs[ncol] = S[i]; cc[ncol] = "q"; cl[ncol] = label[S[i]]; continue }
        for (j = 1; j <= nc; j++) { ncol++; cs[ncol] = S[i]; cc[ncol] = C[j]; cl[ncol] = (S[i] == "livemirror" ? "livemirror NBD" : S[i]) " x" C[j] }
      }
      hdr = "| workload |"; sep = "| --- |"
      for (k = 1; k <= ncol; k++) { hdr = hdr " " cl[k] " |"; sep = sep " ---: |" }
      print "Cells: IOPS / MB/s (10^6 bytes/s)."; print ""; print hdr; print sep
      for (w = 1; w <= nw; w++) {
        line = "| " name[W[w]] " |"
        for (k = 1; k <= ncol; k++) {
          key = cs[k] SUBSEP cc[k] SUBSEP W[w]
          if (!(key in io)) { line = line " — |"; continue }
          cell = fmt(io[key]) sprintf(" / %.1f", bw[key] * 1024 / 1e6)
          if (er[key] != 0) cell = cell " (fio error " er[key] ")"
          line = line " " cell " |"
        }
        print line
      }
      line = "| requests timed out (kernel) |"
      for (k = 1; k <= ncol; k++) line = line " " (to[cs[k], cc[k]] + 0) " |"
      print line
      print ""
      print "CPU time per request, in µs of emulated CPU: the serving process (all its threads; — where its pid is not known: nbd-server forks per connection) / the whole guest (fio, the kernel and the server):"
      print ""; print hdr; print sep
      for (w = 1; w <= nw; w++) {
        line = "| " name[W[w]] " |"
        for (k = 1; k <= ncol; k++) {
          key = cs[k] SUBSEP cc[k] SUBSEP W[w]
          line = line " " ((key in io) ? cpu[key] " / " gcpu[key] : "—") " |"
        }
        print line
      }
      print ""
      # Ratios on IOPS. ublk against livemirror over NBD (at each connection count, and the best
      # of them) and against the best peer at any connection count; livemirror over NBD against
      # the best peer at the same count; each NBD server against its own first count.
      hdr = "| workload |"; sep = "| --- |"
      hasublk = 0; for (i = 1; i <= ns; i++) if (S[i] == "ublk") hasublk = 1
      hashop = 0; for (i = 1; i <= ns; i++) if (S[i] == "ublk-hop") hashop = 1
      if (hasublk) {
        for (j = 1; j <= nc; j++) { hdr = hdr " ublk / NBD x" C[j] " |"; sep = sep " ---: |" }
        hdr = hdr " ublk / best NBD |"; sep = sep " ---: |"
        hdr = hdr " ublk / best peer |"; sep = sep " ---: |"
        if (hashop) { hdr = hdr " ublk hop / ublk |"; sep = sep " ---: |" }
      }
      for (j = 1; j <= nc; j++) { hdr = hdr " NBD x" C[j] " / best peer x" C[j] " |"; sep = sep " ---: |" }
      for (i = 1; i <= ns; i++) if (S[i] !~ /^ublk/) for (j = 2; j <= nc; j++) { hdr = hdr " " S[i] " x" C[j] " / x" C[1] " |"; sep = sep " ---: |" }
      print "Ratios (on IOPS):"; print ""; print hdr; print sep
      for (w = 1; w <= nw; w++) {
        line = "| " name[W[w]] " |"
        if (hasublk) {
          u = io["ublk", "q", W[w]]; bestn = 0; bestp = 0; bp = ""
          for (j = 1; j <= nc; j++) {
            n = io["livemirror", C[j], W[w]]; if (n > bestn) bestn = n
            line = line " " ratio(u, n) " |"
            for (i = 1; i <= ns; i++) if (S[i] != "livemirror" && S[i] !~ /^ublk/ && io[S[i], C[j], W[w]] > bestp) { bestp = io[S[i], C[j], W[w]]; bp = S[i] " x" C[j] }
          }
          line = line " **" ratio(u, bestn) "** |"
          line = line " **" ratio(u, bestp) "** (" bp ") |"
          if (hashop) line = line " " ratio(io["ublk-hop", "q", W[w]], u) " |"
        }
        for (j = 1; j <= nc; j++) {
          best = 0; bn = ""
          for (i = 1; i <= ns; i++) if (S[i] != "livemirror" && S[i] !~ /^ublk/ && io[S[i], C[j], W[w]] > best) { best = io[S[i], C[j], W[w]]; bn = S[i] }
          l = io["livemirror", C[j], W[w]]
          line = line " " ((best > 0 && l > 0) ? sprintf("%.2fx (%s)", l / best, bn) : "—") " |"
        }
        for (i = 1; i <= ns; i++) if (S[i] !~ /^ublk/) for (j = 2; j <= nc; j++) line = line " " ratio(io[S[i], C[j], W[w]], io[S[i], C[1], W[w]]) " |"
        print line
      }
    }' "$O/rows.txt"
  if [ -s "$O/sync.txt" ]; then
    echo
    echo "A livemirror sync inside the guest while fio writes (4K randwrite QD32 on /dev/nbdN, \`attach /dev/vdb\` 0.5 s after fio starts; the copy rate is the bytes copied over the time from attach to \`synced\`, or to the end of fio):"
    echo
    echo "| connections | fio IOPS during the sync | vs the same connections idle | copy MB/s | synced before fio ended | timed-out requests |"
    echo "| ---: | ---: | ---: | ---: | --- | ---: |"
    awk 'function kv(s, k,   n, a, i) { n = split(s, a, " "); for (i = 1; i <= n; i++) if (index(a[i], k "=") == 1) return substr(a[i], length(k) + 2); return "" }
         FNR == NR { if (kv($0, "server") == "livemirror" && kv($0, "workload") == "randwrite4k") idle[kv($0, "conns")] = kv($0, "iops") + 0; next }
         { c = kv($0, "conns"); i = kv($0, "iops") + 0; r = (kv($0, "secs") > 0) ? kv($0, "copied") / kv($0, "secs") / 1e6 : 0
           printf "| %s | %.1fk | %s | %.1f | %s | %s |\n", c, i / 1000, (idle[c] > 0) ? sprintf("%.2fx", i / idle[c]) : "—", r, (kv($0, "synced") == 1) ? "yes" : "no", kv($0, "timeouts") }' \
      "$O/rows.txt" "$O/sync.txt"
  fi
} > "$OUT"
cat "$OUT"
lm_say "written to $OUT (console: $O/console.txt)"
[ -n "${LIVEMIRROR_VM_KEEP:-}" ] || [ -n "${LIVEMIRROR_VM_OUT:-}" ] || rm -rf "$O"
