//! Issue 7, the start of the first scenario: the built image boots in QEMU (OVMF,
//! systemd-boot, slot A's UKI, the dm-verity root), the supervisor becomes ready, and an ACPI
//! power-down ends it cleanly. It prints boot-to-ready and how QEMU ran.
//!
//! The image is `TSUNAGI_IMAGE` (`cargo xtask test` builds it and sets it); without it the
//! test says so and passes, except in CI, where it must run.

use std::path::Path;
use std::time::Duration;

use hil_tests::qemu::Vm;

#[test]
fn the_image_boots_to_a_ready_supervisor_and_powers_down_cleanly() {
    let Some(image) = std::env::var_os("TSUNAGI_IMAGE") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must pass TSUNAGI_IMAGE (cargo xtask test does)"
        );
        eprintln!(
            "skipped: TSUNAGI_IMAGE is not set (cargo xtask test builds the image and sets it)"
        );
        return;
    };
    let mut vm = Vm::boot(Path::new(&image)).unwrap();
    // systemd's console status line once the unit (Type=notify) sent READY=1.
    let ready = vm
        .wait_for("Started tsunagi.service", Duration::from_secs(900))
        .unwrap();
    println!(
        "boot-to-ready: {:.0} s ({})",
        ready.as_secs_f64(),
        if vm.tcg { "TCG" } else { "KVM" }
    );
    let serial = vm.serial();
    assert!(!serial.contains("Kernel panic"), "{}", vm.serial_tail());
    assert!(
        serial.contains("Local Verity Protected Volumes"),
        "the root is not verity-protected:\n{}",
        vm.serial_tail()
    );
    assert!(
        vm.power_down(Duration::from_secs(300)).unwrap(),
        "no clean power-down:\n{}",
        vm.serial_tail()
    );
    assert!(
        vm.serial().contains("reboot: Power down"),
        "{}",
        vm.serial_tail()
    );
}
