//! The monitor, exercised with the real `qemu.qmp` Python client (PyPI) and
//! raw sockets against a running moat: tests/py/test_qmp.py under pytest.

use std::path::Path;
use std::process::Command;

/// The pytest venv that `./test.sh` makes (qemu.qmp and pytest from PyPI).
fn venv() -> std::path::PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyvenv");
    let ready = Command::new(venv.join("bin/python"))
        .args(["-c", "import qemu.qmp, pytest"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ready,
        "{} has no qemu.qmp/pytest: run the tests with ./test.sh, which makes it",
        venv.display()
    );
    venv
}

#[test]
fn qmp_and_hmp_with_the_qemu_qmp_client() {
    let venv = venv();
    let out = Command::new(venv.join("bin/pytest"))
        .args(["-q", "-p", "no:cacheprovider", "tests/py"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MOAT_BIN", env!("CARGO_BIN_EXE_moat"))
        // The tests run as root; test_sandbox.py covers the refusal and the drop.
        .env("MOAT_DANGEROUSLY_ALLOW_ROOT", "1")
        .env("MOAT_TEST_PVH", moat_guests::TEST_PVH)
        .output()
        .expect("running pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "pytest failed:\n{text}");
    assert!(text.contains(" passed"), "pytest ran no test:\n{text}");
}
