//! Real processes race for one device lock: exactly one wins, and SIGKILLing
//! the winner frees the device.
//!
//! The racers are this test binary itself, re-run with `lock_child` selected and
//! told what to do through the environment.

use std::env;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use gpuvm_pci::{DeviceLock, Error, PciAddress};

const CHILD_ENV: &str = "GPUVM_PCI_LOCK_CHILD";
const RACERS: usize = 8;
const VERDICT: &str = "lock-verdict: ";

/// The child side: waits for the start signal, tries the lock once, prints
/// `WON`, `BUSY <holder>` or `ERROR <error>`, and holds a won lock until killed.
#[test]
#[ignore = "a child process of lock_race; it does nothing on its own"]
fn lock_child() {
    let Ok(spec) = env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split('|');
    let (Some(dir), Some(address), Some(holder)) = (parts.next(), parts.next(), parts.next())
    else {
        panic!("bad {CHILD_ENV}: {spec}");
    };
    let dir = Path::new(dir);
    let address = PciAddress::parse(address).unwrap();
    let go = dir.join("go");
    while !go.exists() {
        thread::sleep(Duration::from_millis(1));
    }
    let outcome = DeviceLock::acquire(&dir.join("locks"), &address, holder);
    let mut out = std::io::stdout().lock();
    match &outcome {
        // libtest has printed `test lock_child ... ` without a newline: start a line.
        Ok(_) => writeln!(out, "\n{VERDICT}WON").unwrap(),
        Err(Error::Busy { holder, .. }) => writeln!(out, "\n{VERDICT}BUSY {holder}").unwrap(),
        Err(err) => writeln!(out, "\n{VERDICT}ERROR {err}").unwrap(),
    }
    out.flush().unwrap();
    drop(out);
    if outcome.is_ok() {
        loop {
            thread::sleep(Duration::from_secs(60));
        }
    }
}

fn spawn_racer(dir: &Path, address: &PciAddress, holder: &str) -> Child {
    Command::new(env::current_exe().expect("this test binary's path"))
        .args([
            "--exact",
            "lock_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{}|{address}|{holder}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn a racer")
}

/// The racer's verdict, skipping libtest's own output; fails after 60 s rather
/// than hang when a racer never answers.
fn verdict(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("the racer's stdout is piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(verdict) = line.strip_prefix(VERDICT) {
                let _ = tx.send(verdict.to_owned());
                return;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(verdict) => verdict,
        Err(_) => panic!("racer {} printed no verdict", child.id()),
    }
}

struct KillOnDrop(Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn lock_race() {
    let dir = tempfile::tempdir().unwrap();
    let address = PciAddress::parse("0000:18:00.0").unwrap();
    let lock_dir: PathBuf = dir.path().join("locks");

    let mut racers = KillOnDrop(
        (0..RACERS)
            .map(|i| spawn_racer(dir.path(), &address, &format!("sandbox-{i}")))
            .collect(),
    );
    std::fs::write(dir.path().join("go"), "").unwrap();

    let verdicts: Vec<String> = racers.0.iter_mut().map(verdict).collect();
    let winners: Vec<usize> = (0..RACERS).filter(|&i| verdicts[i] == "WON").collect();
    assert_eq!(winners.len(), 1, "exactly one racer wins: {verdicts:?}");
    let winner = winners[0];
    let winner_pid = racers.0[winner].id();
    let record = format!("pid={winner_pid} holder=sandbox-{winner}");
    for (i, verdict) in verdicts.iter().enumerate().filter(|&(i, _)| i != winner) {
        // A loser may look at the file before the winner has written it.
        assert!(
            verdict == &format!("BUSY {record}") || verdict == "BUSY an unknown holder",
            "racer {i}: {verdict}"
        );
    }

    // Still held: this process is refused too, and told who holds it.
    let err = DeviceLock::acquire(&lock_dir, &address, "parent").unwrap_err();
    let Error::Busy { holder, .. } = &err else {
        panic!("expected Busy, got {err:?}");
    };
    assert_eq!(holder, &record);

    // SIGKILL the winner: the kernel drops its lock with its open files.
    racers.0[winner].kill().unwrap();
    racers.0[winner].wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lock = loop {
        match DeviceLock::acquire(&lock_dir, &address, "parent") {
            Ok(lock) => break lock,
            Err(Error::Busy { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("the lock was not freed by the holder's death: {err}"),
        }
    };
    assert_eq!(lock.address(), address);
}
