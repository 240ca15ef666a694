//! The `with-control-plane` binary against the real control plane: the command sees a
//! `KUBECONFIG` whose API server answers, its exit status comes back, and a loopback
//! control plane is gone afterwards. Without an API server it prints `SKIPPED: <reason>`,
//! or fails when `GPUVM_REQUIRE` names `apiserver`.

use std::process::Command;
use std::time::{Duration, Instant};

use gpuvm_e2e::assets::{self, ServerSource};
use gpuvm_e2e::control_plane::client_for;
use gpuvm_e2e::{Requirement, skip};

const BIN: &str = env!("CARGO_BIN_EXE_with-control-plane");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_the_command_against_a_live_api_server_and_tears_it_down() {
    let loopback = match assets::discover_from_env().expect("the API server environment is valid") {
        ServerSource::Binaries(_) => true,
        ServerSource::Kubeconfig(_) => false,
        ServerSource::Unavailable(reason) => {
            skip(
                Requirement::ApiServer,
                &format!("with_control_plane: {reason}"),
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("kubeconfig");
    let done = dir.path().join("done");
    // The command hands its KUBECONFIG over, waits until the test has used it, and exits
    // with a status of its own.
    let script = format!(
        "cp \"$KUBECONFIG\" '{copy}' && while [ ! -e '{done}' ]; do sleep 0.1; done; exit 7",
        copy = copy.display(),
        done = done.display()
    );
    let mut child = Command::new(BIN)
        .args(["--", "sh", "-c", &script])
        .spawn()
        .expect("with-control-plane starts");

    let deadline = Instant::now() + Duration::from_secs(120);
    while !copy.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "with-control-plane exited before running the command"
        );
        assert!(
            Instant::now() < deadline,
            "the command never got a KUBECONFIG"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The copy names the same server and the same (still existing) certificate files.
    let client = client_for(&copy).await.unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert!(version.git_version.starts_with('v'), "{version:?}");
    let kubeconfig = std::fs::read_to_string(&copy).unwrap();
    let port = server_port(&kubeconfig);

    std::fs::write(&done, b"").unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(7),
        "the command's exit status comes back"
    );
    if loopback {
        let port = port.expect("a loopback server has a port");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "kube-apiserver still listens on {port} after with-control-plane exited"
        );
    }
}

/// The port of a `server: "https://127.0.0.1:PORT"` line.
fn server_port(kubeconfig: &str) -> Option<u16> {
    kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:"))
        .map(|s| s.trim().trim_matches('"'))
        .and_then(|s| s.strip_prefix("https://127.0.0.1:"))
        .and_then(|p| p.parse().ok())
}
