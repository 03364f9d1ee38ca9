//! The monitor, exercised with the real `qemu.qmp` Python client (PyPI) and
//! raw sockets against a running moat: tests/py/test_qmp.py under pytest.

use std::path::Path;
use std::process::Command;

/// The pytest venv (`.ci/run` makes it; made here too when missing).
fn venv() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/pyvenv");
    let reqs = root.join("tests/py/requirements.txt");
    let ready = venv.join("bin/pytest").exists()
        && Command::new(venv.join("bin/python"))
            .args(["-c", "import qemu.qmp, pytest"])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3");
        assert!(st.success(), "python3 -m venv failed");
        let st = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "-r"])
            .arg(&reqs)
            .status()
            .expect("pip");
        assert!(
            st.success(),
            "pip install -r tests/py/requirements.txt failed"
        );
    }
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
