//! `containerd-shim-gpuvm-v1`: containerd runtime v2 shim (task API v3) that runs each
//! pod sandbox in its own micro-VM.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{ExitSignal, Shim, run, spawn};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error as ShimError, Flags, StartOpts, api};
use gpuvm_shim::config::{self, ShimConfig};
use gpuvm_shim::persist::SandboxRecord;
use gpuvm_shim::service::{Service, sandbox_id_of};

/// containerd's runtime type for this shim.
const RUNTIME_ID: &str = "io.containerd.gpuvm.v1";

struct GpuvmShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    bundle: PathBuf,
}

#[async_trait]
impl Shim for GpuvmShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        GpuvmShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            bundle,
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        // One shim per sandbox: containers of a pod join the shim of their sandbox.
        let spec = containerd_shim::asynchronous::util::read_spec(&self.bundle).await?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let grouping = sandbox_id_of(&opts.id, &annotations);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        tokio::fs::write(self.bundle.join("address"), &address)
            .await
            .map_err(|e| ShimError::Other(format!("cannot write the address file: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, ShimError> {
        // containerd's cleanup after a crashed shim: kill what the state file names.
        match SandboxRecord::load(&self.bundle) {
            Ok(Some(record)) => {
                record.clean_up();
                SandboxRecord::remove(&self.bundle);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the state file"),
        }
        // A killed shim leaves its socket file behind: remove it unless a live shim
        // (the pod's, for an app container) still listens on it.
        if let Ok(address) = std::fs::read_to_string(self.bundle.join("address")) {
            let socket = PathBuf::from(address.trim().trim_start_matches("unix://"));
            if std::os::unix::net::UnixStream::connect(&socket).is_err() {
                let _ = std::fs::remove_file(&socket);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(api::DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(Timestamp {
                seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        Service::new(&self.namespace, self.exit.clone(), Some(publisher))
    }
}

#[tokio::main]
async fn main() {
    // The log level comes from the config file named by the environment (or the
    // default path); runtime options can only name another file later, at Create.
    let env = std::env::var(config::CONFIG_ENV).ok();
    let (path, explicit) = config::config_path(None, env.as_deref());
    let log_level = ShimConfig::load(&path, explicit)
        .map(|c| c.log_level)
        .unwrap_or_else(|_| "info".to_owned());
    // The shim waits for its own children (VMM, virtiofsd, vhost-device-vsock) with
    // tokio; a global reaper would steal their exit statuses.
    let shim_config = Config {
        default_log_level: log_level,
        no_reaper: true,
        ..Default::default()
    };
    run::<GpuvmShim>(RUNTIME_ID, Some(shim_config)).await;
}
