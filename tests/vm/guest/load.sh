# shellcheck shell=dash disable=SC3028 # run by busybox sh in the guest, which has $RANDOM
# Write load: "sh load.sh DIR". Until /run/lmtest/stop exists, writes files with random content
# (8..256 KiB, fsync'd) named after the phase they started in, appends "sha256  name" to
# DIR/MANIFEST and "name start-phase end-phase" to DIR/PHASES, and rewrites one random 4 KiB
# block of DIR/hot.bin in place each round (the same blocks again and again: regions the copier
# has already copied become dirty again). Exit status = number of errors.
. /lmtest/common.sh
D=$1
n=0
errs=0
while [ ! -e /run/lmtest/stop ]; do
  n=$((n + 1))
  p0=$(cat /run/lmtest/phase)
  name=$(printf '%s-%04d.bin' "$p0" "$n")
  kb=$(( (RANDOM % 32 + 1) * 8 ))
  if ! dd if=/dev/urandom of="$D/$name" bs=1024 count=$kb conv=fsync 2>/dev/null; then
    echo "LMTEST FAIL: load: writing $name failed"; errs=$((errs + 1)); break
  fi
  sum=$(sha256sum "$D/$name") || { echo "LMTEST FAIL: load: reading $name failed"; errs=$((errs + 1)); break; }
  echo "${sum%% *}  $name" >> "$D/MANIFEST"
  if ! dd if=/dev/urandom of="$D/hot.bin" bs=4096 count=1 seek=$((RANDOM % 64)) conv=notrunc,fsync 2>/dev/null; then
    echo "LMTEST FAIL: load: rewriting hot.bin failed"; errs=$((errs + 1)); break
  fi
  echo "$name $p0 $(cat /run/lmtest/phase)" >> "$D/PHASES"
  [ $((n % 4)) = 0 ] && sync
done
sha256sum "$D/hot.bin" | sed 's|  .*/|  |' > "$D/hot.sha256"
sync
echo "LMTEST INFO: load: wrote $n files, $errs errors"
exit $errs
