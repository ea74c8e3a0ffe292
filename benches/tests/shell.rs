//! Paths put into the harness's shell commands stay one word, whatever they hold.

use std::path::Path;
use std::process::Command;

use cloudlet_benches::shell_quote;

#[test]
fn quoted_paths_stay_one_word() {
    let t = tempfile::tempdir().unwrap();
    let canary = t.path().join("canary");
    std::fs::write(&canary, b"keep").unwrap();
    for name in [
        "plain",
        "with space",
        "comma,and space",
        "it's",
        "''",
        "semi;colon",
        "$(touch injected)",
        "`touch injected`",
        "star*",
        "new\nline",
        "back\\slash",
        "-dash",
    ] {
        let p = t.path().join(name);
        // printf shows the word exactly; `rm -rf` of the quoted path plus a suffix glob removes only it.
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &format!("printf %s {}", shell_quote(&p))])
            .current_dir(t.path())
            .output()
            .unwrap();
        assert_eq!(Path::new(std::str::from_utf8(&out.stdout).unwrap()), p, "{name:?}");
        std::fs::write(&p, b"x").unwrap();
        std::fs::write(t.path().join(format!("{name}.tmp")), b"x").unwrap();
        let st = Command::new("bash")
            .args(["-c", &format!("rm -rf {}*", shell_quote(&p))])
            .current_dir(t.path())
            .status()
            .unwrap();
        assert!(st.success(), "{name:?}");
        assert!(!p.exists() && !t.path().join(format!("{name}.tmp")).exists(), "{name:?} not removed");
        assert!(!t.path().join("injected").exists(), "{name:?} ran a command");
        assert_eq!(std::fs::read(&canary).unwrap(), b"keep", "{name:?} removed another file");
    }
}
