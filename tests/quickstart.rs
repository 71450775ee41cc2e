//! The quickstart example runs and exits 0 (it is built by `cargo test` as an example target).

use std::process::Command;

#[test]
fn quickstart_runs() {
    // `cargo test` builds examples; run the built binary next to this test's executable.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let bin = dir.join(format!("quickstart{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "quickstart example not built at {}",
        bin.display()
    );
    let out = Command::new(&bin).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("reply: \"hello, game server\""), "{stdout}");
    assert!(
        stdout.contains("chat from 1.1.1: \"a chat line\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("has no handler for method \"missing\""),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("quickstart: ok"), "{stdout}");
}
