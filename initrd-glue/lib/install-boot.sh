# shellcheck shell=sh disable=SC2034 # (it shares variables with livemirror-install)
# install-boot.sh: how livemirror-install makes the disk boot by itself (step 11), and the
# checks in step 1 that make sure it can, before anything is changed.
# Installed as /usr/lib/livemirror/install-boot.sh; sourced by livemirror-install (never run).
#
#   firmware  bios: GRUB for i386-pc in the disk's boot sector (MBR gap or BIOS boot partition)
#             uefi: an EFI system partition mounted on /boot/efi, with GRUB for x86_64-efi or
#                   systemd-boot, always also at the removable-media path EFI/BOOT/BOOTX64.EFI
#                   (what a firmware with no boot entry starts), plus an NVRAM boot entry when
#                   the firmware's variables are writable
#   initramfs the system's own generator: dracut, or initramfs-tools (update-initramfs)
#   command line the running one without what only the live (or livemirror) boot needed

EFI_GLOBAL=8be4df61-93ca-11d0-aa58-00a0c93ec93b
EFI_LOADER=4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
EFIVARS=/sys/firmware/efi/efivars
ESP_MOUNT=/boot/efi
SDBOOT_EFI=/usr/lib/systemd/boot/efi/systemd-bootx64.efi

detect_firmware() { if [ -d /sys/firmware/efi ]; then echo uefi; else echo bios; fi; }
# efivar_value NAME-GUID: a variable's value, without its 4 bytes of attributes. (Read from the
# start through a pipe: efivarfs files cannot seek, and tail -c +N on the file itself reads
# nothing.)
# shellcheck disable=SC2002 # (a pipe, not the file: tail would seek)
efivar_value() { cat "$EFIVARS/$1" 2>/dev/null | tail -c +5; }
# efivar_text NAME-GUID: a UCS-2 text variable as ASCII.
efivar_text() { efivar_value "$1" | tr -d '\000'; }
secure_boot_on() {
	[ "$(efivar_value "SecureBoot-$EFI_GLOBAL" | od -An -tu1 | tr -d ' \n')" = 1 ]
}
efivars_writable() {
	awk -v m="$EFIVARS" '$2 == m && $3 == "efivarfs" {split($4, o, ","); w = (o[1] == "rw")} END {exit !w}' /proc/mounts
}
# booted_by_systemd_boot: systemd-boot tells the system it booted it (LoaderInfo).
booted_by_systemd_boot() { case $(efivar_text "LoaderInfo-$EFI_LOADER") in systemd-boot*) return 0 ;; esac; return 1; }
# detect_loader FIRMWARE: systemd-boot where it booted this (UEFI) system, else GRUB.
detect_loader() {
	if [ "$1" = uefi ] && booted_by_systemd_boot && command -v bootctl >/dev/null 2>&1; then
		echo systemd-boot
	else
		echo grub
	fi
}
# detect_generator: the system's initramfs generator. Debian-family systems have
# initramfs-tools (update-initramfs) unless dracut replaced it; others have dracut.
detect_generator() {
	if command -v update-initramfs >/dev/null 2>&1 && [ -d /usr/share/initramfs-tools ] &&
		{ [ -e /etc/kernel/postinst.d/initramfs-tools ] || ! command -v dracut >/dev/null 2>&1; }; then
		echo initramfs-tools
	elif command -v dracut >/dev/null 2>&1; then
		echo dracut
	fi
}

# boot_check: step 1's part for step 11. Settles FIRMWARE, LOADER and GENERATOR, and refuses
# with the reason whatever would make step 11 fail, while nothing has been changed yet. Needs
# DISK, PARTITION (a whole disk to partition) or PART, and ESP_DEV for a partition TARGET.
boot_check() {
	NB="use --no-bootloader and install a boot loader yourself"
	KVER=$(uname -r)
	[ -f "/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-$KVER: the installed system needs the running kernel in /boot ($NB)"
	_bc_boot=$(mount_source /boot)
	[ -z "$_bc_boot" ] || die "/boot is a file system of its own ($_bc_boot): I move only the root file system, so the installed system would lose its kernels ($NB)"
	[ "$GENERATOR" = auto ] && GENERATOR=$(detect_generator)
	case $GENERATOR in
	dracut) need dracut "to build the installed system's initramfs" "$NB" ;;
	initramfs-tools)
		need update-initramfs "to build the installed system's initramfs" "$NB"
		need mkinitramfs "to build the installed system's initramfs" "$NB"
		;;
	"") die "neither dracut nor initramfs-tools is installed: nothing can build the installed system's initramfs ($NB)" ;;
	*) die "--initramfs $GENERATOR: dracut or initramfs-tools" ;;
	esac
	case $FIRMWARE:$LOADER in
	bios:grub)
		need grub-install "the boot loader" "$NB"
		need grub-mkconfig "the boot loader's configuration" "$NB"
		[ -d /usr/lib/grub/i386-pc ] || die "GRUB for BIOS (i386-pc, Debian package grub-pc-bin) is not installed ($NB)"
		;;
	uefi:grub)
		need grub-install "the boot loader" "$NB"
		need grub-mkconfig "the boot loader's configuration" "$NB"
		[ -d /usr/lib/grub/x86_64-efi ] || die "GRUB for UEFI (x86_64-efi, Debian package grub-efi-amd64-bin) is not installed ($NB)"
		if secure_boot_on && [ ! -e /usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed ]; then
			die "Secure Boot is on and no signed GRUB is installed (Debian: shim-signed, grub-efi-amd64-signed): the firmware would refuse the boot loader ($NB)"
		fi
		;;
	uefi:systemd-boot)
		need bootctl "systemd-boot's installer" "$NB"
		need kernel-install "to put the kernel on the EFI system partition" "$NB"
		[ -f "$SDBOOT_EFI" ] || die "systemd-boot is not installed ($SDBOOT_EFI is missing; Debian package systemd-boot) ($NB)"
		secure_boot_on && die "Secure Boot is on: this installer does not sign systemd-boot ($NB)"
		;;
	bios:systemd-boot) die "systemd-boot needs UEFI firmware (this install is for BIOS: --firmware)" ;;
	*) die "--bootloader $LOADER: grub or systemd-boot" ;;
	esac
	if [ "$FIRMWARE" = uefi ]; then
		# The EFI system partition is FAT: step 11 mounts it.
		modprobe -q vfat 2>/dev/null
		grep -qw vfat /proc/filesystems || die "this kernel cannot mount FAT file systems (vfat), which the EFI system partition holds ($NB)"
		# The EFI system partition: made in step 2 on a whole disk; on a partitioned disk, the one
		# it has, formatted only if it holds nothing.
		if [ -n "$PARTITION" ]; then
			need mkfs.vfat "to format the EFI system partition" "$NB"
		else
			[ -n "$ESP_DEV" ] || die "internal: no EFI system partition on $DISK"
			case $(fs_type "$ESP_DEV") in
			vfat) ESP_FORMAT='' ;;
			"") ESP_FORMAT=1; need mkfs.vfat "to format the EFI system partition $ESP_DEV" "$NB" ;;
			*) die "the EFI system partition $ESP_DEV holds $(fs_type "$ESP_DEV"), not FAT ($NB)" ;;
			esac
			_bc_m=$(awk -v d="$ESP_DEV" '$1 == d {print $2}' /proc/mounts | head -n 1)
			[ -z "$_bc_m" ] || [ "$_bc_m" = "$ESP_MOUNT" ] || die "the EFI system partition $ESP_DEV is mounted on $_bc_m: unmount it first"
		fi
		if efivars_writable && { [ "$LOADER" = systemd-boot ] || command -v efibootmgr >/dev/null 2>&1; }; then
			NVRAM=1
		else
			NVRAM=
		fi
		_bc_old=$(mount_source "$ESP_MOUNT")
		[ -n "$_bc_old" ] && [ "$_bc_old" != "$ESP_DEV" ] && did "$ESP_MOUNT is $_bc_old now: step 11 mounts the new EFI system partition there instead"
	fi
	case $LOADER in
	grub) _bc_w="GRUB for $([ "$FIRMWARE" = uefi ] && echo UEFI || echo BIOS)" ;;
	*) _bc_w=$LOADER ;;
	esac
	did "boot: $_bc_w, initramfs by $GENERATOR, kernel $KVER${NVRAM:+, an NVRAM boot entry}"
}

# The kernel command line of the installed system: the running one without what only a live or
# livemirror boot needs (root=, rd.live.*, livemirror's options, the boot loader's own words).
installed_cmdline() {
	# shellcheck disable=SC2013 # (words, not lines)
	for _a in $(cat /proc/cmdline); do
		case $_a in
		BOOT_IMAGE=* | initrd=* | root=* | rootfstype=* | rootflags=* | ro | rw | rd.live.* | liveimg | \
			live_dir=* | rd.writable.fsimg* | rd.livemirror | rd.livemirror=* | rd.livemirror.* | livemirror.* | iso-scan/* | \
			findiso=* | boot=live | rd.luks* | rd.lvm* | rd.md* | rd.dm* | systemd.machine_id=*) ;;
		*) printf '%s ' "$_a" ;;
		esac
	done
}

# boot_log CMD...: runs CMD with its output in the log; on failure, the log's last lines.
boot_log() {
	echo "+ $*" >>"$LOG"
	"$@" >>"$LOG" 2>&1 && return 0
	BOOT_LOG_TAIL=$(tail -n 3 "$LOG" | tr '\n' ' ')
	return 1
}

# keep_shutdown_path: this session still shuts down through the initramfs it booted from (its
# livemirror hook detaches the root). dracut-shutdown unpacks /boot's image at shutdown, which
# is about to become the installed one: unpack the running one now.
keep_shutdown_path() {
	if [ -e /run/initramfs/.need_shutdown ] && [ ! -e /run/initramfs/bin/sh ] && [ -x /usr/lib/dracut/dracut-initramfs-restore ]; then
		if boot_log /usr/lib/dracut/dracut-initramfs-restore; then
			did "kept this session's shutdown path: its initramfs is unpacked in /run/initramfs"
		else
			did "note: could not unpack this session's initramfs into /run/initramfs (the shutdown may not detach livemirror cleanly)"
		fi
	fi
}

# no_livemirror_by_default: the installed system boots without livemirror (rd.livemirror turns
# it on for one boot), whatever the live medium's /etc/livemirror/initrd.conf said.
no_livemirror_by_default() {
	_nl=/etc/livemirror/initrd.conf
	[ -r "$_nl" ] && grep -Eq '^[[:space:]]*LIVEMIRROR_ENABLE=["'\'']?(1|y|yes|on|true)' "$_nl" || return 0
	sed -i -E 's/^([[:space:]]*)LIVEMIRROR_ENABLE=.*/\1LIVEMIRROR_ENABLE=0 # (set by livemirror-install: rd.livemirror turns it on)/' "$_nl" ||
		die "cannot edit $_nl"
	did "$_nl: LIVEMIRROR_ENABLE=0 (the live medium had it on; the installed system boots without livemirror)"
}

# build_initramfs: /boot/initrd.img-KVER for booting from PART, by the system's generator.
build_initramfs() {
	IMG=/boot/initrd.img-$KVER
	_bi_t=$(now)
	no_livemirror_by_default
	case $GENERATOR in
	dracut)
		# No live modules, no livemirror, host-only (this machine), the root from the command line.
		mkdir -p /etc/dracut.conf.d
		cat >/etc/dracut.conf.d/99-livemirror-installed.conf <<-'EOF'
			# Written by livemirror-install: this system was installed from a live medium and boots
			# from its disk. The live medium's modules stay out of its initramfs.
			omit_dracutmodules+=" livemirror dmsquash-live dmsquash-live-ntfs dmsquash-live-autooverlay livenet "
			hostonly="yes"
			hostonly_cmdline="no"
		EOF
		if ! boot_log dracut --force --add-device "$PART" "$IMG.new" "$KVER"; then
			rm -f "$IMG.new"
			die "dracut could not build the installed system's initramfs (log: $LOG): $BOOT_LOG_TAIL"
		fi
		if command -v lsinitrd >/dev/null 2>&1 && lsinitrd "$IMG.new" 2>/dev/null | grep -qE 'livemirror|dmsquash'; then
			rm -f "$IMG.new"
			die "the new initramfs still holds livemirror or dmsquash-live (see $LOG and /etc/dracut.conf.d)"
		fi
		mv "$IMG.new" "$IMG" || die "cannot replace $IMG"
		did "$IMG: built by dracut for booting from disk in $(($(now) - _bi_t)) s ($(($(wc -c <"$IMG") / 1024)) KiB; no livemirror, no dmsquash-live)"
		;;
	initramfs-tools)
		# MODULES=dep would take the drivers of the device / is mounted from now: /dev/nbd0's.
		_bi_mod=$(
			set +u
			# shellcheck disable=SC1090,SC1091
			. /etc/initramfs-tools/initramfs.conf 2>/dev/null
			# shellcheck disable=SC1090
			for _f in /etc/initramfs-tools/conf.d/*; do [ -r "$_f" ] && . "$_f"; done
			echo "${MODULES:-most}"
		)
		if [ "$_bi_mod" = dep ]; then
			echo "MODULES=most # livemirror-install: with dep, the initramfs would get the drivers of /dev/nbd0, not of the disk" \
				>/etc/initramfs-tools/conf.d/zz-livemirror-install
			did "MODULES=dep would pick the drivers of $NBD: /etc/initramfs-tools/conf.d/zz-livemirror-install sets MODULES=most"
		fi
		# (the livemirror hook stays: without rd.livemirror its boot script does nothing)
		boot_log update-initramfs -c -k "$KVER" || die "update-initramfs could not build the installed system's initramfs (log: $LOG): $BOOT_LOG_TAIL"
		[ -s "$IMG" ] || die "update-initramfs made no $IMG (log: $LOG)"
		did "$IMG: built by update-initramfs (initramfs-tools) in $(($(now) - _bi_t)) s ($(($(wc -c <"$IMG") / 1024)) KiB; livemirror stays off without rd.livemirror)"
		;;
	esac
}

# mount_esp: the EFI system partition on /boot/efi (another one mounted there goes), and in
# /etc/fstab.
mount_esp() {
	[ "$(fs_type "$ESP_DEV")" = vfat ] || die "the EFI system partition $ESP_DEV holds no FAT file system"
	_me_old=$(mount_source "$ESP_MOUNT")
	if [ -n "$_me_old" ] && [ "$_me_old" != "$ESP_DEV" ]; then
		umount "$ESP_MOUNT" 2>/dev/null || die "cannot unmount $ESP_MOUNT ($_me_old), where the new EFI system partition goes"
		did "unmounted $ESP_MOUNT ($_me_old)"
	fi
	if [ "$(mount_source "$ESP_MOUNT")" != "$ESP_DEV" ]; then
		mkdir -p "$ESP_MOUNT"
		_me_out=$(mount -t vfat -o umask=0077 "$ESP_DEV" "$ESP_MOUNT" 2>&1) || die "cannot mount $ESP_DEV on $ESP_MOUNT: $_me_out"
	fi
	ESP_UUID=$(fs_uuid "$ESP_DEV")
	[ -n "$ESP_UUID" ] || die "the EFI system partition $ESP_DEV has no UUID (blkid -p)"
	fstab_line "$ESP_MOUNT" "UUID=$ESP_UUID $ESP_MOUNT vfat umask=0077 0 1"
	did "$ESP_DEV mounted on $ESP_MOUNT; /etc/fstab: UUID=$ESP_UUID $ESP_MOUNT vfat"
}

# fstab_line MOUNTPOINT LINE: LINE mounts MOUNTPOINT in /etc/fstab; an older line for it is kept
# as a comment, every other line stays.
fstab_line() {
	{
		[ -r /etc/fstab ] && awk -v m="$1" '$1 !~ /^#/ && $2 == m {print "# (replaced by livemirror-install) " $0; next} {print}' /etc/fstab
		echo "$2"
	} >/etc/fstab.livemirror-install || die "cannot write /etc/fstab.livemirror-install"
	mv /etc/fstab.livemirror-install /etc/fstab || die "cannot replace /etc/fstab"
	[ -d /run/systemd/system ] && systemctl daemon-reload >/dev/null 2>&1
	return 0
}

# grub_settings CMDL: GRUB's settings for the installed system: the command line, a serial
# console if the running system has one, in a file of its own that is read last. livemirror's
# boot options, wherever /etc/default/grub(.d) had them (added for the one boot into livemirror
# that moving an installed root takes), are removed: a later boot would wait for a source that
# is gone.
grub_settings() {
	rm -f /etc/default/grub.d/90-livemirror-install.cfg # (older versions' name)
	for _f in /etc/default/grub /etc/default/grub.d/*.cfg; do
		if [ ! -f "$_f" ] || [ "${_f##*/}" = zz-livemirror-install.cfg ]; then continue; fi
		grep -Eq '^[^#]*(rd\.livemirror|livemirror\.[a-z_-]+=)' "$_f" || continue
		sed -i -E '/^[[:space:]]*#/! {
			s/[[:space:]]*rd\.livemirror(\.[a-z_-]+)?(=[^[:space:]"'"'"']*)?([[:space:]"'"'"']|$)/\3/g
			s/[[:space:]]*livemirror\.[a-z_-]+=[^[:space:]"'"'"']*//g
		}' "$_f" || die "cannot edit $_f"
		did "removed livemirror's boot options from $_f: the installed system boots without them"
	done
	_gs_def=$(
		set +u
		# shellcheck disable=SC1090,SC1091
		[ -r /etc/default/grub ] && . /etc/default/grub
		for _f in /etc/default/grub.d/*.cfg; do
			# shellcheck disable=SC1090
			[ -r "$_f" ] && [ "${_f##*/}" != zz-livemirror-install.cfg ] && . "$_f"
		done
		printf '%s' "${GRUB_CMDLINE_LINUX_DEFAULT:-}"
	)
	# (what the default options add is on the running command line too: not twice)
	_gs_lin=
	for _a in $1; do
		case " $_gs_def " in *" $_a "*) ;; *) _gs_lin="$_gs_lin $_a" ;; esac
	done
	mkdir -p /etc/default/grub.d
	{
		echo "# Written by livemirror-install: the kernel command line of the session it installed from,"
		echo "# without its live and livemirror options."
		echo "GRUB_CMDLINE_LINUX=\"${_gs_lin# }\""
		_gs_ser=$(echo "$1" | tr ' ' '\n' | sed -n 's/^console=ttyS\([0-9]*\),*\([0-9]*\).*/\1 \2/p' | tail -n 1)
		if [ -n "$_gs_ser" ]; then
			# shellcheck disable=SC2086 # (two words: unit and speed)
			set -- $_gs_ser
			echo "GRUB_TERMINAL=\"serial console\""
			echo "GRUB_SERIAL_COMMAND=\"serial --unit=$1 --speed=${2:-115200}\""
		fi
	} >/etc/default/grub.d/zz-livemirror-install.cfg
}

# install_grub: GRUB for BIOS on DISK, or for UEFI on the ESP (its own directory and the
# removable-media path), and grub.cfg.
install_grub() {
	grub_settings "$CMDL"
	# GRUB's core image is told the partition table and file system itself: grub-install would
	# otherwise take them from the device / is mounted from, /dev/nbd0, which has neither.
	case $(sfdisk -d "$DISK" 2>/dev/null | sed -n 's/^label: //p') in gpt) _ig_pm=part_gpt ;; *) _ig_pm=part_msdos ;; esac
	_ig_mods="$_ig_pm ext2 search_fs_uuid"
	if [ "$FIRMWARE" = bios ]; then
		boot_log grub-install --target=i386-pc --modules="$_ig_mods" "$DISK" ||
			die "grub-install $DISK failed (log: $LOG): $BOOT_LOG_TAIL"
		did "GRUB for BIOS installed on $DISK"
	else
		EFI_ID=$(
			# shellcheck disable=SC1091
			[ -r /etc/os-release ] && . /etc/os-release
			echo "${ID:-linux}"
		)
		boot_log grub-install --target=x86_64-efi --efi-directory="$ESP_MOUNT" --bootloader-id="$EFI_ID" \
			--no-nvram --modules="$_ig_mods" ||
			die "grub-install --target=x86_64-efi failed (log: $LOG): $BOOT_LOG_TAIL"
		EFI_PATH=/EFI/$EFI_ID/grubx64.efi
		[ -s "$ESP_MOUNT$EFI_PATH" ] || die "grub-install left no $ESP_MOUNT$EFI_PATH (log: $LOG)"
		did "GRUB for UEFI installed: $ESP_MOUNT$EFI_PATH"
		if removable_path_free; then
			boot_log grub-install --target=x86_64-efi --efi-directory="$ESP_MOUNT" --removable \
				--no-nvram --modules="$_ig_mods" ||
				die "grub-install --removable failed (log: $LOG): $BOOT_LOG_TAIL"
			[ -s "$ESP_MOUNT/EFI/BOOT/BOOTX64.EFI" ] || die "grub-install --removable left no $ESP_MOUNT/EFI/BOOT/BOOTX64.EFI (log: $LOG)"
			did "and at the removable-media path $ESP_MOUNT/EFI/BOOT/BOOTX64.EFI (a firmware without a boot entry starts it)"
		fi
		nvram_entry
	fi
	boot_log grub-mkconfig -o /boot/grub/grub.cfg || die "grub-mkconfig failed (log: $LOG): $BOOT_LOG_TAIL"
	grep -q "root=UUID=$UUID" /boot/grub/grub.cfg ||
		die "/boot/grub/grub.cfg does not boot root=UUID=$UUID (see $LOG): $(grep -m 1 '^[[:space:]]*linux' /boot/grub/grub.cfg)"
	did "/boot/grub/grub.cfg: $(grep -c '^[[:space:]]*linux' /boot/grub/grub.cfg) boot entries, root=UUID=$UUID"
}

# removable_path_free: whether EFI/BOOT/BOOTX64.EFI may be written: yes on an ESP made in this
# run or holding none; another system's loader there is kept.
removable_path_free() {
	[ -e "$ESP_MOUNT/EFI/BOOT/BOOTX64.EFI" ] || return 0
	[ -n "$ESP_MADE" ] && return 0
	did "kept the EFI/BOOT/BOOTX64.EFI that $ESP_DEV had: this disk starts through its NVRAM entry"
	return 1
}

# nvram_entry: a firmware boot entry for EFI_PATH on the ESP, first in the boot order (an older
# entry of ours for the same partition goes). Only when the variables are writable.
nvram_entry() {
	if [ -z "$NVRAM" ]; then
		did "no NVRAM boot entry (the firmware's variables are not writable, or no efibootmgr): the disk starts through EFI/BOOT/BOOTX64.EFI"
		return 0
	fi
	_ne_k=$(kname "$ESP_DEV")
	_ne_n=$(cat "/sys/class/block/$_ne_k/partition")
	_ne_disk=/dev/$(disk_of "$_ne_k")
	_ne_puuid=$(blkid -p -o value -s PART_ENTRY_UUID "$ESP_DEV" 2>/dev/null | tr 'A-F' 'a-f')
	for _ne_b in $(efibootmgr -v 2>/dev/null | awk -v l="$EFI_ID" -v u="$_ne_puuid" 'tolower($0) ~ u && $2 == l {sub(/^Boot/, "", $1); sub(/\*$/, "", $1); print $1}'); do
		boot_log efibootmgr -q -b "$_ne_b" -B || true
	done
	_ne_l=$(printf '%s' "$EFI_PATH" | sed 's|/|\\|g')
	boot_log efibootmgr -q -c -d "$_ne_disk" -p "$_ne_n" -L "$EFI_ID" -l "$_ne_l" ||
		die "efibootmgr could not add the boot entry (log: $LOG): $BOOT_LOG_TAIL"
	did "NVRAM boot entry \"$EFI_ID\" for $_ne_disk partition $_ne_n, $_ne_l, first in the boot order"
}

# install_systemd_boot: systemd-boot on the ESP (bootctl also writes the removable-media path
# and, when it can, the NVRAM entry), the kernel and initramfs beside it (kernel-install), the
# command line in /etc/kernel/cmdline.
install_systemd_boot() {
	[ -s /etc/machine-id ] || boot_log systemd-machine-id-setup || die "no /etc/machine-id and systemd-machine-id-setup failed"
	printf 'root=UUID=%s ro %s\n' "$UUID" "$CMDL" >/etc/kernel/cmdline
	_sb_var=--no-variables
	[ -n "$NVRAM" ] && _sb_var=
	# shellcheck disable=SC2086 # (an option or none)
	boot_log bootctl install --esp-path="$ESP_MOUNT" $_sb_var || die "bootctl install failed (log: $LOG): $BOOT_LOG_TAIL"
	[ -s "$ESP_MOUNT/EFI/BOOT/BOOTX64.EFI" ] || die "bootctl left no $ESP_MOUNT/EFI/BOOT/BOOTX64.EFI (log: $LOG)"
	did "systemd-boot installed on $ESP_MOUNT (and at EFI/BOOT/BOOTX64.EFI)${NVRAM:+, with its NVRAM boot entry}"
	# kernel-install puts boot entries where it finds the entry directory.
	_sb_tok=$(cat /etc/kernel/entry-token 2>/dev/null || cat /etc/machine-id)
	mkdir -p "$ESP_MOUNT/$_sb_tok"
	BOOT_ROOT=$ESP_MOUNT boot_log kernel-install add "$KVER" "/boot/vmlinuz-$KVER" "/boot/initrd.img-$KVER" ||
		die "kernel-install add $KVER failed (log: $LOG): $BOOT_LOG_TAIL"
	_sb_e=$(grep -l "root=UUID=$UUID" "$ESP_MOUNT"/loader/entries/*"$KVER"*.conf 2>/dev/null | head -n 1)
	[ -n "$_sb_e" ] || die "kernel-install wrote no boot entry for $KVER with root=UUID=$UUID in $ESP_MOUNT/loader/entries (log: $LOG)"
	did "boot entry $_sb_e: kernel $KVER, root=UUID=$UUID"
}

# boot_step: step 11.
boot_step() {
	LOG=/var/log/livemirror-install.log
	: >"$LOG"
	keep_shutdown_path
	build_initramfs
	CMDL=$(installed_cmdline)
	CMDL=${CMDL% }
	did "kernel command line of the installed system: $CMDL"
	[ "$FIRMWARE" = uefi ] && mount_esp
	case $LOADER in
	grub) install_grub ;;
	systemd-boot) install_systemd_boot ;;
	esac
	# (what the JSON stream's result reports)
	FIRMWARE_DONE=$FIRMWARE LOADER_DONE=$LOADER GENERATOR_DONE=$GENERATOR
}
