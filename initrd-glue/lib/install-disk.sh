# shellcheck shell=sh disable=SC2034 # (it shares variables with livemirror-install)
# install-disk.sh: livemirror-install's disk layout: which partition table a whole-disk TARGET
# gets and what goes on it, whether a disk whose partition the user named has room for the
# boot loader, and the partition step itself.
# Installed as /usr/lib/livemirror/install-disk.sh; sourced by livemirror-install (never run).
# The functions that decide (plan_layout, check_boot_room, esp_in_dump) only compute from their
# arguments and an `sfdisk -d` dump, so that they can be tried on image files (tests/installer_disk.rs).

# Partition types: GPT type GUIDs and MBR system ids.
GPT_ESP=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
GPT_BIOS_BOOT=21686148-6449-6E6F-744E-656564454649
GPT_LINUX=0FC63DAF-8483-4772-8E79-3D69D8477DE4
MBR_ESP=ef
MBR_LINUX=83
MIB=1048576
# An MBR partition table counts sectors in 32 bits: 2 TiB with 512-byte sectors.
MBR_MAX_SECTORS=4294967296

# plan_layout FIRMWARE TABLE DISK_BYTES SECTOR_BYTES ESP_BYTES: the partitions a whole disk gets.
#   FIRMWARE bios|uefi, TABLE auto|gpt|dos. auto is GPT on UEFI, MBR on BIOS up to 2 TiB and GPT
#   beyond (MBR cannot address more).
#   bios + dos:  1: the root, from 1 MiB, bootable (GRUB's core image goes in the 1 MiB before it)
#   bios + gpt:  1: BIOS boot partition (1 MiB, where GRUB's core image goes)  2: the root
#   uefi + gpt:  1: EFI system partition (ESP_BYTES)  2: the root
#   uefi + dos:  1: EFI system partition (type ef)    2: the root
# Sets LAYOUT_TABLE (gpt|dos), LAYOUT_SCRIPT (sfdisk input), LAYOUT_ROOT_N, LAYOUT_ESP_N and
# LAYOUT_BIOS_BOOT_N (partition numbers; empty when there is none), LAYOUT_ROOT_START and
# LAYOUT_ROOT_MIN (bytes: where the root begins, and at least how large it will be), and
# LAYOUT_WORDS (the layout in words). On a layout that cannot be made: LAYOUT_ERROR, return 1.
plan_layout() {
	_pl_fw=$1 _pl_table=$2 _pl_disk=$3 _pl_ss=$4 _pl_esp=$5
	LAYOUT_ERROR='' LAYOUT_ESP_N='' LAYOUT_BIOS_BOOT_N='' LAYOUT_SCRIPT=''
	_pl_sectors=$((_pl_disk / _pl_ss))
	case $_pl_table in
	auto)
		if [ "$_pl_fw" = uefi ] || [ "$_pl_sectors" -gt "$MBR_MAX_SECTORS" ]; then _pl_table=gpt; else _pl_table=dos; fi
		;;
	gpt) ;;
	dos | mbr)
		_pl_table=dos
		if [ "$_pl_sectors" -gt "$MBR_MAX_SECTORS" ]; then
			LAYOUT_ERROR="the disk is $(mib "$_pl_disk"), more than an MBR partition table addresses ($(mib $((MBR_MAX_SECTORS * _pl_ss)))): use GPT (--partition-table gpt, or leave it to me)"
			return 1
		fi
		;;
	*)
		LAYOUT_ERROR="unknown partition table $_pl_table (gpt, dos or auto)"
		return 1
		;;
	esac
	LAYOUT_TABLE=$_pl_table
	case $_pl_fw:$_pl_table in
	bios:dos)
		LAYOUT_ROOT_N=1 LAYOUT_ROOT_START=$MIB
		LAYOUT_SCRIPT="label: dos
start=1MiB, type=$MBR_LINUX, bootable"
		LAYOUT_WORDS="MBR partition table; 1: the root from 1 MiB, bootable (GRUB goes before it)"
		;;
	bios:gpt)
		LAYOUT_BIOS_BOOT_N=1 LAYOUT_ROOT_N=2 LAYOUT_ROOT_START=$((2 * MIB))
		LAYOUT_SCRIPT="label: gpt
start=1MiB, size=1MiB, type=$GPT_BIOS_BOOT, name=\"BIOS boot\"
start=2MiB, type=$GPT_LINUX, name=\"root\""
		LAYOUT_WORDS="GPT; 1: BIOS boot partition (1 MiB, for GRUB), 2: the root"
		;;
	uefi:gpt | uefi:dos)
		if [ $((_pl_esp % MIB)) != 0 ] || [ "$_pl_esp" -lt $((32 * MIB)) ]; then
			LAYOUT_ERROR="the EFI system partition must be a whole number of MiB and at least 32 MiB (FAT32), not $_pl_esp bytes"
			return 1
		fi
		LAYOUT_ESP_N=1 LAYOUT_ROOT_N=2 LAYOUT_ROOT_START=$((MIB + _pl_esp))
		if [ "$_pl_table" = gpt ]; then
			LAYOUT_SCRIPT="label: gpt
start=1MiB, size=$((_pl_esp / MIB))MiB, type=$GPT_ESP, name=\"EFI system\"
start=$((LAYOUT_ROOT_START / MIB))MiB, type=$GPT_LINUX, name=\"root\""
			LAYOUT_WORDS="GPT; 1: EFI system partition ($(mib "$_pl_esp")), 2: the root"
		else
			LAYOUT_SCRIPT="label: dos
start=1MiB, size=$((_pl_esp / MIB))MiB, type=$MBR_ESP
start=$((LAYOUT_ROOT_START / MIB))MiB, type=$MBR_LINUX"
			LAYOUT_WORDS="MBR partition table; 1: EFI system partition ($(mib "$_pl_esp"), type ef), 2: the root"
		fi
		;;
	*)
		LAYOUT_ERROR="unknown firmware $_pl_fw (bios or uefi)"
		return 1
		;;
	esac
	# (GPT keeps a copy of itself in the last sectors; sfdisk ends the last partition on a MiB)
	_pl_tail=0
	[ "$_pl_table" = gpt ] && _pl_tail=$MIB
	LAYOUT_ROOT_MIN=$(((_pl_disk - LAYOUT_ROOT_START - _pl_tail) / MIB * MIB))
	[ "$LAYOUT_ROOT_MIN" -gt 0 ] || LAYOUT_ROOT_MIN=0
	return 0
}

# dump_label DUMP: the partition table type of an `sfdisk -d` dump (dos, gpt, or nothing).
dump_label() { printf '%s\n' "$1" | sed -n 's/^label: *//p'; }
# dump_parts DUMP: one line per partition: NODE START SIZE TYPE (type as written in the dump).
dump_parts() {
	printf '%s\n' "$1" | awk '/ : start=/ {
		node = $1; start = ""; size = ""; type = ""
		line = substr($0, index($0, ":") + 1)
		n = split(line, f, ",")
		for (i = 1; i <= n; i++) {
			kv = f[i]; gsub(/^ +| +$/, "", kv)
			k = substr(kv, 1, index(kv, "=") - 1); v = substr(kv, index(kv, "=") + 1); gsub(/^ +/, "", v)
			if (k == "start") start = v; else if (k == "size") size = v; else if (k == "type") type = v
		}
		print node, start, size, type }'
}
# esp_in_dump DUMP: the node of the first EFI system partition in an `sfdisk -d` dump.
esp_in_dump() {
	dump_parts "$1" | awk -v g="$GPT_ESP" -v m="$MBR_ESP" 'toupper($4) == g || tolower($4) == m {print $1; exit}'
}

# check_boot_room FIRMWARE DUMP: whether the disk in DUMP (`sfdisk -d`), on a partition of which
# the user wants the system, has a place for the boot loader: on BIOS, 1 MiB before the first
# partition of an MBR disk or a BIOS boot partition on a GPT disk; on UEFI, an EFI system
# partition. Returns 1 with the reason in BOOT_ROOM_ERROR when it has none.
check_boot_room() {
	BOOT_ROOM_ERROR=''
	_cb_label=$(dump_label "$2")
	case $1:$_cb_label in
	bios:dos)
		_cb_first=$(dump_parts "$2" | awk '{print $2}' | sort -n | head -n 1)
		[ "${_cb_first:-0}" -ge 2048 ] && return 0
		BOOT_ROOM_ERROR="its first partition starts at sector ${_cb_first:-?}: no room for GRUB before it (1 MiB needed)"
		;;
	bios:gpt)
		dump_parts "$2" | awk -v g="$GPT_BIOS_BOOT" 'toupper($4) == g {f = 1} END {exit !f}' && return 0
		BOOT_ROOM_ERROR="it has a GPT without a BIOS boot partition: no place for GRUB"
		;;
	uefi:dos | uefi:gpt)
		[ -n "$(esp_in_dump "$2")" ] && return 0
		BOOT_ROOM_ERROR="it has no EFI system partition (GPT type $GPT_ESP, MBR type ef): no place for the UEFI boot loader"
		;;
	*)
		BOOT_ROOM_ERROR="its partition table cannot be read"
		;;
	esac
	return 1
}

# partition_disk DISK K: writes LAYOUT_SCRIPT onto DISK (kernel name K), waits for the kernel's
# partitions, and sets PART (the root's partition) and ESP_DEV (the EFI system partition, if the
# layout has one). Signatures left on the disk and in the new partitions' places are wiped.
partition_disk() {
	if ! _pd_out=$(printf '%s\n' "$LAYOUT_SCRIPT" | sfdisk --quiet --wipe always --wipe-partitions always "$1" 2>&1); then
		die "sfdisk $1: $_pd_out"
	fi
	settle
	# sfdisk has the kernel read the new table; where it shows no partitions after a while
	# (busy, or no parser for the table), partx tells it them one by one.
	if ! wait_until 5 partition_n "$2" "$LAYOUT_ROOT_N" >/dev/null; then
		partx -u "$1" >/dev/null 2>&1 || partx -a "$1" >/dev/null 2>&1
		settle
		wait_until 5 partition_n "$2" "$LAYOUT_ROOT_N" >/dev/null ||
			die "the kernel shows no partition $LAYOUT_ROOT_N on $1 after sfdisk (and partx)"
	fi
	PART=/dev/$(partition_n "$2" "$LAYOUT_ROOT_N")
	wait_until 10 test -b "$PART" || die "no device node $PART after sfdisk"
	ESP_DEV=
	if [ -n "$LAYOUT_ESP_N" ]; then
		ESP_DEV=/dev/$(partition_n "$2" "$LAYOUT_ESP_N")
		wait_until 10 test -b "$ESP_DEV" || die "no device node $ESP_DEV after sfdisk"
	fi
}

# format_esp DEV: a FAT32 file system on an EFI system partition that holds none.
format_esp() {
	_fe_out=$(mkfs.vfat -F 32 -n EFI "$1" 2>&1) || die "mkfs.vfat $1: $_fe_out"
}
