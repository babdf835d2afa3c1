//! The bank (the real example binary, `target/<profile>/examples/bank`)
//! under a dying Redis: the redis-server is SIGKILLed mid-run. The bank
//! must end within seconds with a clear message naming the server, stop its
//! workers, report what was committed, and exit 3; never hang. Then, the
//! server restarted on its AOF, a second run recovers and the money adds up.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tm::redis::testing::TestServer;

/// The bank example built beside this test (cargo builds examples for
/// `cargo test`).
fn bank_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let bank = profile_dir.join("examples").join("bank");
    assert!(
        bank.exists(),
        "{} is missing: build it with `cargo test` (it builds the examples) or `cargo build --example bank`",
        bank.display()
    );
    bank
}

#[test]
fn the_bank_stops_within_seconds_when_redis_dies_and_the_next_run_recovers() {
    let mut server = TestServer::builder().fsync_always(true).start();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("bank.db");
    let mut child = Command::new(bank_exe())
        .args([
            "--accounts",
            "20",
            "--threads",
            "4",
            "--transfers",
            "100000000",
        ])
        .arg("--sqlite")
        .arg(&sqlite)
        .arg("--redis")
        .arg(server.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the bank");
    // Let it run and commit some transfers, then kill Redis under it.
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the bank ended early");
    server.kill();
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the bank still runs 30 s after Redis died: it hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stopped_after = killed.elapsed();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let all = format!("{out}\n{err}");
    eprintln!("the bank stopped {stopped_after:?} after Redis died; its output:\n{all}");
    assert_eq!(status.code(), Some(3), "exit code; output:\n{all}");
    // The server is named, and what was committed is reported.
    let port = server.port().to_string();
    assert!(all.contains(&port), "the server is not named:\n{all}");
    assert!(
        all.contains("committed"),
        "no report of what committed:\n{all}"
    );
    // A bound, not a performance claim: the reconnect deadline is 3 s.
    assert!(
        stopped_after < Duration::from_secs(20),
        "it took {stopped_after:?} to stop"
    );

    // Redis back on its AOF: the next run recovers and checks the total.
    server.restart();
    let rerun = Command::new(bank_exe())
        .args(["--accounts", "20", "--threads", "2", "--transfers", "200"])
        .args(["--grace", "0"])
        .arg("--sqlite")
        .arg(&sqlite)
        .arg("--redis")
        .arg(server.url())
        .output()
        .expect("run the bank again");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&rerun.stdout),
        String::from_utf8_lossy(&rerun.stderr)
    );
    assert_eq!(rerun.status.code(), Some(0), "second run:\n{text}");
}
