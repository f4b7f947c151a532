//! livemirror-install's disk decisions, tried on image files and a loop device on the host:
//! which partition table and partitions a whole disk gets for each firmware and size (MBR up
//! to 2 TiB on BIOS, GPT with a BIOS boot partition beyond, GPT with an EFI system partition on
//! UEFI), what a partitioned disk needs before the installer puts a system on one of its
//! partitions, and the partition step itself (sfdisk, the kernel's partitions, the ESP's FAT).
//! The functions are the installer's own (initrd-glue/lib/install-disk.sh), sourced by `sh`.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const GPT_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const GPT_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const GPT_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

fn lib_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("initrd-glue/lib")
}

/// Runs `script` in `sh -u` after sourcing the installer's common and disk parts.
fn sh(script: &str) -> Output {
    let lib = lib_dir();
    let full = format!(
        "set -u\nPATH=$PATH:/usr/sbin:/sbin\n. '{}/install-common.sh'\n. '{}/install-disk.sh'\n{script}",
        lib.display(),
        lib.display()
    );
    Command::new("sh").arg("-c").arg(full).output().unwrap_or_else(|e| panic!("cannot run sh: {e}"))
}

fn text(o: &Output) -> String {
    format!("stdout: {}stderr: {}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("PATH=$PATH:/usr/sbin:/sbin command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{tool} is missing: apt-get install {package} (.ci/run installs it)");
}

/// What plan_layout decided.
#[derive(Debug)]
struct Layout {
    table: String,
    script: String,
    root_n: String,
    esp_n: String,
    bios_boot_n: String,
    root_start: u64,
    root_min: u64,
}

fn plan(firmware: &str, table: &str, disk: u64, sector: u64, esp: u64) -> Result<Layout, String> {
    let o = sh(&format!(
        "if plan_layout {firmware} {table} {disk} {sector} {esp}; then\n\
         printf 'table=%s\\nroot_n=%s\\nesp_n=%s\\nbios_n=%s\\nstart=%s\\nmin=%s\\n' \
         \"$LAYOUT_TABLE\" \"$LAYOUT_ROOT_N\" \"$LAYOUT_ESP_N\" \"$LAYOUT_BIOS_BOOT_N\" \"$LAYOUT_ROOT_START\" \"$LAYOUT_ROOT_MIN\"\n\
         printf '%s\\n' \"$LAYOUT_SCRIPT\" >&2\n\
         else echo \"$LAYOUT_ERROR\"; exit 3; fi"
    ));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    match o.status.code() {
        Some(0) => {}
        Some(3) => return Err(out.trim().to_string()),
        _ => panic!("plan_layout {firmware} {table} {disk}: {}", text(&o)),
    }
    let get = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {out}"))
            .to_string()
    };
    Ok(Layout {
        table: get("table"),
        script: String::from_utf8_lossy(&o.stderr).into_owned(),
        root_n: get("root_n"),
        esp_n: get("esp_n"),
        bios_boot_n: get("bios_n"),
        root_start: get("start").parse().unwrap(),
        root_min: get("min").parse().unwrap(),
    })
}

/// A partition as sfdisk reads it back: (start, size) in bytes, type, bootable.
#[derive(Debug)]
struct Part {
    start: u64,
    size: u64,
    ptype: String,
    bootable: bool,
}

/// Writes `script` onto a sparse image of `size` bytes with sfdisk (a file has 512-byte
/// sectors; `sector` must say so) and reads the table back: (label, partitions).
fn apply(dir: &Path, name: &str, size: u64, sector: u64, script: &str) -> (String, Vec<Part>) {
    need("sfdisk", "fdisk");
    let img = dir.join(name);
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--wipe", "always"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "sfdisk rejected the installer's script:\n{script}\n{}", text(&o));
    readback(&img, sector)
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn bios_disk_up_to_2_tib_gets_mbr_with_the_root_from_1_mib() {
    let d = tmp();
    for size in [GIB, 2 * TIB] {
        let l = plan("bios", "auto", size, 512, 256 * MIB).unwrap();
        assert_eq!(
            (l.table.as_str(), l.root_n.as_str(), l.esp_n.as_str(), l.bios_boot_n.as_str()),
            ("dos", "1", "", ""),
            "{l:?}"
        );
        let (label, parts) = apply(d.path(), "bios.img", size, 512, &l.script);
        assert_eq!(label, "dos");
        assert_eq!(parts.len(), 1, "{parts:?}");
        let root = &parts[0];
        assert_eq!((root.start, root.ptype.as_str(), root.bootable), (MIB, "83", true), "{parts:?}");
        assert_eq!(root.start, l.root_start);
        assert!(root.size >= l.root_min && root.size <= size - MIB, "root {root:?}, promised at least {}", l.root_min);
        std::fs::remove_file(d.path().join("bios.img")).unwrap();
    }
}

#[test]
fn bios_disk_over_2_tib_gets_gpt_with_a_bios_boot_partition() {
    let d = tmp();
    let size = 3 * TIB;
    let l = plan("bios", "auto", size, 512, 256 * MIB).unwrap();
    assert_eq!(
        (l.table.as_str(), l.bios_boot_n.as_str(), l.root_n.as_str(), l.esp_n.as_str()),
        ("gpt", "1", "2", ""),
        "{l:?}"
    );
    let (label, parts) = apply(d.path(), "big.img", size, 512, &l.script);
    assert_eq!(label, "gpt");
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!((parts[0].start, parts[0].size, parts[0].ptype.as_str()), (MIB, MIB, GPT_BIOS_BOOT), "{parts:?}");
    assert_eq!((parts[1].start, parts[1].ptype.as_str()), (2 * MIB, GPT_LINUX), "{parts:?}");
    assert_eq!(parts[1].start, l.root_start);
    // The root reaches past the 2 TiB an MBR could address, to within the GPT's backup copy.
    assert!(parts[1].start + parts[1].size > 2 * TIB + GIB, "{parts:?}");
    assert!(parts[1].size >= l.root_min, "root {:?}, promised at least {}", parts[1], l.root_min);
    assert!(l.root_min > size - 4 * MIB, "the promise is too low: {}", l.root_min);
    // MBR asked for by name on such a disk is refused, with the reason.
    let e = plan("bios", "dos", size, 512, 256 * MIB).unwrap_err();
    assert!(e.contains("MBR") && e.contains("GPT"), "{e}");
    // With 4 KiB sectors an MBR addresses 16 TiB: the same disk keeps MBR, its root from 1 MiB.
    let l4 = plan("bios", "auto", size, 4096, 256 * MIB).unwrap();
    assert_eq!(l4.table, "dos", "{l4:?}");
    assert_eq!(l4.root_start, MIB, "{l4:?}");
    // GPT on BIOS by choice, below 2 TiB.
    let l = plan("bios", "gpt", GIB, 512, 256 * MIB).unwrap();
    assert_eq!((l.table.as_str(), l.bios_boot_n.as_str()), ("gpt", "1"), "{l:?}");
}

#[test]
fn uefi_disk_gets_gpt_with_an_efi_system_partition() {
    let d = tmp();
    let size = 2 * GIB;
    for esp in [256 * MIB, 512 * MIB] {
        let l = plan("uefi", "auto", size, 512, esp).unwrap();
        assert_eq!(
            (l.table.as_str(), l.esp_n.as_str(), l.root_n.as_str(), l.bios_boot_n.as_str()),
            ("gpt", "1", "2", ""),
            "{l:?}"
        );
        let (label, parts) = apply(d.path(), "uefi.img", size, 512, &l.script);
        assert_eq!(label, "gpt");
        assert_eq!((parts[0].start, parts[0].size, parts[0].ptype.as_str()), (MIB, esp, GPT_ESP), "{parts:?}");
        assert_eq!((parts[1].start, parts[1].ptype.as_str()), (MIB + esp, GPT_LINUX), "{parts:?}");
        assert_eq!(parts[1].start, l.root_start);
        assert!(
            parts[1].size >= l.root_min && l.root_min > size - esp - 4 * MIB,
            "root {:?}, promised {}",
            parts[1],
            l.root_min
        );
        std::fs::remove_file(d.path().join("uefi.img")).unwrap();
    }
    // MBR on UEFI by choice: the ESP is type ef.
    let l = plan("uefi", "dos", size, 512, 256 * MIB).unwrap();
    let (label, parts) = apply(d.path(), "uefi-dos.img", size, 512, &l.script);
    assert_eq!(label, "dos");
    assert_eq!((parts[0].ptype.as_str(), parts[0].size, parts[1].ptype.as_str()), ("EF", 256 * MIB, "83"), "{parts:?}");
    // An ESP too small for FAT32, or not in whole MiB, is refused.
    for bad in [16 * MIB, 256 * MIB + 512] {
        let e = plan("uefi", "auto", size, 512, bad).unwrap_err();
        assert!(e.contains("EFI system partition"), "{e}");
    }
    let e = plan("bios", "zfs", size, 512, 256 * MIB).unwrap_err();
    assert!(e.contains("unknown partition table"), "{e}");
}

/// check_boot_room on the `sfdisk -d` dump of an image partitioned with `script`.
fn boot_room(dir: &Path, firmware: &str, script: &str) -> Result<String, String> {
    let img = dir.join("room.img");
    let _ = std::fs::remove_file(&img);
    std::fs::File::create(&img).unwrap().set_len(GIB).unwrap();
    if !script.is_empty() {
        let _ = apply(dir, "room.img", GIB, 512, script);
    }
    let o = sh(&format!(
        "DUMP=$(sfdisk -d '{}' 2>/dev/null)\nif check_boot_room {firmware} \"$DUMP\"; then echo \"ok esp=$(esp_in_dump \"$DUMP\")\"; \
         else echo \"$BOOT_ROOM_ERROR\"; exit 3; fi",
        img.display()
    ));
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    match o.status.code() {
        Some(0) => Ok(out),
        Some(3) => Err(out),
        _ => panic!("check_boot_room: {}", text(&o)),
    }
}

#[test]
fn a_partition_target_needs_room_for_the_boot_loader_on_its_disk() {
    let d = tmp();
    let p = d.path();
    // BIOS, MBR: GRUB needs the 1 MiB before the first partition.
    assert!(boot_room(p, "bios", "label: dos\nstart=2048, type=83\n").is_ok());
    let e = boot_room(p, "bios", "label: dos\nstart=63, size=100000, type=83\nstart=2048000, type=83\n").unwrap_err();
    assert!(e.contains("sector 63") && e.contains("no room for GRUB"), "{e}");
    // BIOS, GPT: a BIOS boot partition.
    let e = boot_room(p, "bios", &format!("label: gpt\nstart=1MiB, type={GPT_LINUX}\n")).unwrap_err();
    assert!(e.contains("BIOS boot partition"), "{e}");
    assert!(boot_room(
        p,
        "bios",
        &format!("label: gpt\nstart=1MiB, size=1MiB, type={GPT_BIOS_BOOT}\nstart=2MiB, type={GPT_LINUX}\n")
    )
    .is_ok());
    // UEFI: an EFI system partition, found by its type (GPT or MBR).
    let e = boot_room(p, "uefi", &format!("label: gpt\nstart=1MiB, type={GPT_LINUX}\n")).unwrap_err();
    assert!(e.contains("no EFI system partition"), "{e}");
    let ok = boot_room(p, "uefi", &format!("label: gpt\nstart=1MiB, size=64MiB, type={GPT_LINUX}\nstart=65MiB, size=64MiB, type={GPT_ESP}\nstart=129MiB, type={GPT_LINUX}\n")).unwrap();
    assert!(ok.ends_with("room.img2"), "the ESP is the second partition: {ok}");
    let ok = boot_room(p, "uefi", "label: dos\nstart=1MiB, size=64MiB, type=ef\nstart=65MiB, type=83\n").unwrap();
    assert!(ok.ends_with("room.img1"), "{ok}");
    // No partition table at all.
    let e = boot_room(p, "bios", "").unwrap_err();
    assert!(e.contains("cannot be read"), "{e}");
}

/// A loop device over an image file, detached when dropped.
struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn loop_device(img: &Path, sector: u64) -> Loop {
    let o = Command::new("losetup")
        .args(["--sector-size", &sector.to_string(), "-P", "-f", "--show"])
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "losetup: {}", text(&o));
    Loop(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn need_root_and_loops() {
    need("losetup", "mount");
    need("partx", "util-linux");
    need("blkid", "util-linux");
    let euid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&euid.stdout).trim(),
        "0",
        "this test partitions loop devices: run it as root (as .ci/run does)"
    );
}

#[test]
fn the_partition_step_on_a_loop_device_makes_the_layout_and_a_fat32_esp() {
    need_root_and_loops();
    need("mkfs.vfat", "dosfstools");
    need("fsck.vfat", "dosfstools");
    let d = tmp();
    let img = d.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(2 * GIB).unwrap();
    // An old file-system signature where the root will begin must not survive the partitioning.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "PATH=$PATH:/usr/sbin:/sbin; mkfs.vfat -F 32 --offset $((257 * 2048)) '{}' 65536 >/dev/null",
            img.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "mkfs.vfat at an offset: {}", text(&o));
    let lo = loop_device(&img, 512);
    let dev = lo.0.clone();
    let k = dev.trim_start_matches("/dev/").to_string();
    let o = sh(&format!(
        "NSTEPS=11\nplan_layout uefi auto $(size_of {dev}) $(sector_size_of {dev}) $((256 * MIB)) || {{ echo \"$LAYOUT_ERROR\"; exit 3; }}\n\
         partition_disk {dev} {k}\nformat_esp \"$ESP_DEV\"\n\
         echo \"part=$PART esp=$ESP_DEV esp_fs=$(fs_type \"$ESP_DEV\") root_fs=$(fs_type \"$PART\") root_size=$(size_of \"$PART\")\""
    ));
    assert!(o.status.success(), "partition step: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains(&format!("part={dev}p2 esp={dev}p1 esp_fs=vfat root_fs= ")), "{out}");
    let fsck =
        Command::new("sh").arg("-c").arg(format!("PATH=$PATH:/usr/sbin:/sbin fsck.vfat -n {dev}p1")).output().unwrap();
    assert!(fsck.status.success(), "fsck.vfat -n on the new ESP: {}", text(&fsck));
    let size: u64 = out.split("root_size=").nth(1).unwrap().trim().parse().unwrap();
    assert!(size > 2 * GIB - 260 * MIB, "root partition {size} bytes");
    drop(lo);
    let (label, parts) = readback(&img, 512);
    assert_eq!(label, "gpt");
    assert_eq!((parts[0].ptype.as_str(), parts[1].ptype.as_str()), (GPT_ESP, GPT_LINUX), "{parts:?}");
}

#[test]
fn on_a_disk_with_4k_sectors_the_root_still_begins_at_1_mib() {
    need_root_and_loops();
    let d = tmp();
    let img = d.path().join("disk4k.img");
    std::fs::File::create(&img).unwrap().set_len(GIB).unwrap();
    let lo = loop_device(&img, 4096);
    let dev = lo.0.clone();
    let k = dev.trim_start_matches("/dev/").to_string();
    let o = sh(&format!(
        "NSTEPS=11\nplan_layout bios auto $(size_of {dev}) $(sector_size_of {dev}) $((256 * MIB)) || exit 3\n\
         partition_disk {dev} {k}\necho \"ss=$(sector_size_of {dev}) part=$PART start=$(cat /sys/class/block/{k}p1/start)\""
    ));
    assert!(o.status.success(), "partition step: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // (sysfs counts 512-byte units whatever the device's sectors: 2048 is 1 MiB)
    assert!(out.contains(&format!("ss=4096 part={dev}p1 start=2048")), "{out}");
    drop(lo);
    let (label, parts) = readback(&img, 4096);
    assert_eq!((label.as_str(), parts[0].start, parts[0].ptype.as_str()), ("dos", MIB, "83"), "{parts:?}");
}

/// The partition table of an image, read back in `sector`-byte units.
fn readback(img: &Path, sector: u64) -> (String, Vec<Part>) {
    let o = Command::new("sfdisk").arg("--json").arg(img).output().unwrap();
    assert!(o.status.success(), "sfdisk --json: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = &v["partitiontable"];
    let parts = t["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Part {
            start: p["start"].as_u64().unwrap() * sector,
            size: p["size"].as_u64().unwrap() * sector,
            ptype: p["type"].as_str().unwrap().to_uppercase(),
            bootable: p["bootable"].as_bool().unwrap_or(false),
        })
        .collect();
    (t["label"].as_str().unwrap().to_string(), parts)
}
