//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set with one `kind` label (error kind, or reconcile result).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The label value.
    pub kind: String,
}

/// Label set with one `call` label: which API call on a machine's path was timed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    /// `finalizer`, `commit`, `status`, `pod_get`, `pod_list`, `pod_create`, `record_read`.
    pub call: String,
}

/// Label set with one `model` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// GPU model.
    pub model: String,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles run, by result (`ok`, `error`).
    pub reconciles: Family<KindLabel, Counter>,
    /// Reconcile errors, by error kind.
    pub errors: Family<KindLabel, Counter>,
    /// Seconds from "machine is unplaced" to "allocation written".
    pub placement_seconds: Histogram,
    /// Seconds per API call on a machine's path, by call: where a placement's time goes.
    pub api_seconds: Family<CallLabel, Histogram, fn() -> Histogram>,
    /// Free GPUs on ready nodes, by model.
    pub gpus_free: Family<ModelLabel, Gauge>,
    /// Allocated GPUs, by model.
    pub gpus_allocated: Family<ModelLabel, Gauge>,
    /// Machines no node can take right now.
    pub unschedulable: Gauge,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    registry: Registry,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `gpuvm_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gpuvm_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        let errors = Family::<KindLabel, Counter>::default();
        // 100 µs .. ~3 s: placement itself is microseconds, the API write milliseconds.
        let placement_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 16),
        );
        let api_seconds: Family<CallLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| {
                // 1 ms .. ~30 s: a write on a loaded API server can take seconds.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1e-3, 2.0, 16,
                ))
            });
        let gpus_free = Family::<ModelLabel, Gauge>::default();
        let gpus_allocated = Family::<ModelLabel, Gauge>::default();
        let unschedulable = Gauge::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles run, by result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors, by kind",
            errors.clone(),
        );
        registry.register(
            "placement_seconds",
            "Time to choose GPUs and record the allocation",
            placement_seconds.clone(),
        );
        registry.register(
            "api_seconds",
            "Seconds per API call on a machine's path, by call",
            api_seconds.clone(),
        );
        registry.register(
            "gpus_free",
            "Free GPUs on ready nodes, by model",
            gpus_free.clone(),
        );
        registry.register(
            "gpus_allocated",
            "Allocated GPUs, by model",
            gpus_allocated.clone(),
        );
        registry.register(
            "unschedulable_machines",
            "Machines no node can take right now",
            unschedulable.clone(),
        );
        registry.register("leader", "1 while this replica leads", leader.clone());
        Metrics {
            reconciles,
            errors,
            placement_seconds,
            api_seconds,
            gpus_free,
            gpus_allocated,
            unschedulable,
            leader,
            registry,
            ready: AtomicBool::new(false),
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Marks the operator ready (caches synced) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Awaits `call` and records how long it took under `api_seconds{call}`.
    pub async fn timed<T>(&self, call: &str, fut: impl std::future::Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let out = fut.await;
        self.api_seconds
            .get_or_create(&CallLabel { call: call.into() })
            .observe(started.elapsed().as_secs_f64());
        out
    }

    /// Sets the per-model GPU gauges from `(free, allocated)` counts.
    pub fn set_usage(&self, usage: &std::collections::BTreeMap<String, (u32, u32)>) {
        for (model, (free, allocated)) in usage {
            let label = ModelLabel {
                model: model.clone(),
            };
            self.gpus_free.get_or_create(&label).set(i64::from(*free));
            self.gpus_allocated
                .get_or_create(&label)
                .set(i64::from(*allocated));
        }
    }
}

/// The HTTP router serving the metrics and probes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn serve_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

/// Serves the router on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(metrics)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_answer() {
        let metrics = Arc::new(Metrics::new());
        metrics
            .reconciles
            .get_or_create(&KindLabel { kind: "ok".into() })
            .inc();
        metrics.set_usage(&std::collections::BTreeMap::from([(
            "l40s".to_owned(),
            (3, 1),
        )]));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(axum::serve(listener, router(metrics.clone())).into_future());

        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let body = get("/metrics").await;
        assert!(
            body.contains("gpuvm_operator_reconciles_total{kind=\"ok\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("gpuvm_operator_gpus_free{model=\"l40s\"} 3"),
            "{body}"
        );
        assert!(
            body.contains("gpuvm_operator_placement_seconds_bucket"),
            "{body}"
        );
        metrics.timed("status", async {}).await;
        let body = get("/metrics").await;
        assert!(
            body.contains("gpuvm_operator_api_seconds_count{call=\"status\"} 1"),
            "{body}"
        );
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.set_ready(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        server.abort();
    }
}
