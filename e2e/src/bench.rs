//! Placement benchmarks against the real API server: each machine's apply is timed, its
//! Pod is seen through a watch (no polling lists, which at thousands of Pods would load
//! the server being measured), and the API server's own pace is measured beside it with
//! the same number of plain Pods created by a client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use gpuvm_api::{GpuMachine, keys};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::watcher::{self, watcher};
use tokio::task::JoinHandle;

use crate::TestEnv;

/// Machine name → when something was first seen for it.
type Clock = Arc<Mutex<HashMap<String, Instant>>>;

/// Watches the test namespace's machine Pods and notes when each machine's first Pod
/// appeared. Stops when dropped.
#[derive(Debug)]
pub struct PodWatch {
    seen: Clock,
    task: JoinHandle<()>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodWatch {
    /// Starts the watch and returns once its initial list is done, so no Pod created
    /// afterwards is missed.
    pub async fn start(env: &TestEnv) -> anyhow::Result<PodWatch> {
        let seen: Clock = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let config = watcher::Config::default().labels(keys::LABEL_MACHINE);
        // An `Api` of `PartialObjectMeta` asks for metadata only.
        let api: Api<PartialObjectMeta<Pod>> = Api::namespaced(env.client.clone(), &env.namespace);
        let stream = watcher(api, config);
        let clock = seen.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                let objects = match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => vec![o],
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                        Vec::new()
                    }
                    // The watcher re-lists on its own after an error.
                    _ => Vec::new(),
                };
                let mut seen = clock.lock().unwrap_or_else(|e| e.into_inner());
                for pod in objects {
                    if let Some(machine) = pod.labels().get(keys::LABEL_MACHINE) {
                        seen.entry(machine.clone()).or_insert(now);
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), ready_rx)
            .await
            .context("the Pod watch did not list within 60 s")?
            .context("the Pod watch ended before its first list")?;
        Ok(PodWatch { seen, task })
    }

    /// How many machines have a Pod.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// When each machine's first Pod was seen.
    pub fn seen(&self) -> HashMap<String, Instant> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Applies the machines, `parallel` requests at a time, and returns when each apply was
/// answered. An overloaded API server's transient failures (5xx, dropped connections)
/// are retried, a rejection is not.
pub async fn apply_timed(
    env: &TestEnv,
    machines: &[GpuMachine],
    parallel: usize,
) -> anyhow::Result<HashMap<String, Instant>> {
    let answered = futures::stream::iter(machines.iter().map(|m| async move {
        let mut attempt = 0;
        loop {
            match env.apply(m).await {
                Ok(_) => return anyhow::Ok((m.name_any(), Instant::now())),
                Err(kube::Error::Api(s)) if s.code < 500 => {
                    return Err(kube::Error::Api(s))
                        .with_context(|| format!("applying {}", m.name_any()));
                }
                Err(e) if attempt >= 10 => {
                    return Err(e).with_context(|| format!("applying {}", m.name_any()));
                }
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }))
    .buffer_unordered(parallel)
    .try_collect::<HashMap<_, _>>()
    .await?;
    Ok(answered)
}

/// What one placement run measured.
#[derive(Clone, Debug)]
pub struct PlacementRun {
    /// How many machines were applied.
    pub machines: usize,
    /// From the first apply until the last was answered.
    pub applied: Duration,
    /// From the first apply until every machine had a Pod.
    pub done: Duration,
    /// Per machine, from its apply's answer to its first Pod.
    pub latency: Option<Latency>,
}

impl PlacementRun {
    /// Machines placed (with their Pods) per second, from the first apply.
    pub fn per_second(&self) -> f64 {
        f64::from(u32::try_from(self.machines).unwrap_or(u32::MAX)) / self.done.as_secs_f64()
    }
}

impl std::fmt::Display for PlacementRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} machines applied in {:.1} s, all Pods in {:.1} s: {:.1} machines/s; apply → Pod: {}",
            self.machines,
            self.applied.as_secs_f64(),
            self.done.as_secs_f64(),
            self.per_second(),
            self.latency
                .map_or_else(|| "not measured".to_owned(), |l| l.to_string())
        )
    }
}

/// Applies `machines` (`parallel` at a time) and waits until each has a Pod, at most
/// `timeout`; `tick` is called with the number of machines with a Pod every `every`.
pub async fn place_all(
    env: &TestEnv,
    machines: &[GpuMachine],
    parallel: usize,
    timeout: Duration,
    every: Duration,
    mut tick: impl FnMut(usize),
) -> anyhow::Result<PlacementRun> {
    let watch = PodWatch::start(env).await?;
    let started = Instant::now();
    let apply = async {
        let answered = apply_timed(env, machines, parallel).await?;
        anyhow::Ok((answered, started.elapsed()))
    };
    let wait = async {
        let mut next_tick = Instant::now();
        loop {
            let count = watch.count();
            if Instant::now() >= next_tick {
                tick(count);
                next_tick += every;
            }
            if count >= machines.len() {
                return anyhow::Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "only {count} of {} machines had a Pod after {} s",
                machines.len(),
                timeout.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ((answered, applied), done) = futures::try_join!(apply, wait)?;
    Ok(PlacementRun {
        machines: machines.len(),
        applied,
        done,
        latency: Latency::between(&answered, &watch.seen()),
    })
}

/// Creates `n` plain Pods (no machine, no runtime class) in the test's namespace,
/// `parallel` at a time, as fast as the API server takes them; returns how long it took.
pub async fn plain_pods(env: &TestEnv, n: usize, parallel: usize) -> anyhow::Result<Duration> {
    let pods = env.pods();
    let started = Instant::now();
    futures::stream::iter((0..n).map(|i| {
        let pods = pods.clone();
        async move {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("plain-{i:05}"), "labels": {"gpuvm.dev/e2e-plain": "true"}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
            }))?;
            pods.create(&kube::api::PostParams::default(), &pod)
                .await
                .with_context(|| format!("creating plain Pod {i}"))?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(parallel)
    .try_collect::<Vec<_>>()
    .await?;
    Ok(started.elapsed())
}

/// CPU seconds used by each process of a run (the control plane's, the operator, this
/// test's client), read before and after: on a small shared box the run is bound by CPU,
/// and this says who spent it.
#[derive(Clone, Debug, Default)]
pub struct CpuUse(Vec<(String, f64)>);

impl CpuUse {
    /// Reads the CPU time of the control plane's processes, the operator's and this one's.
    pub fn read(env: &TestEnv, operator: &crate::Operator) -> CpuUse {
        let mut all: Vec<(String, f64)> = env
            .cp
            .cpu_seconds()
            .into_iter()
            .map(|(n, s)| (n.to_owned(), s))
            .collect();
        all.extend(operator.cpu_seconds().map(|s| ("operator".to_owned(), s)));
        all.extend(
            crate::process::cpu_seconds(std::process::id()).map(|s| ("test client".to_owned(), s)),
        );
        CpuUse(all)
    }

    /// `name: N s (M ms per machine)` for each process, from `self` to `after`.
    pub fn lines_until(&self, after: &CpuUse, machines: usize) -> Vec<String> {
        let per = machines.max(1) as f64;
        after
            .0
            .iter()
            .filter_map(|(name, end)| {
                let (_, start) = self.0.iter().find(|(n, _)| n == name)?;
                let used = end - start;
                Some(format!(
                    "{name}: {used:.1} s CPU ({:.1} ms per machine)",
                    used / per * 1e3
                ))
            })
            .collect()
    }
}

/// The API server's own count of the requests it answered (`apiserver_request_total`
/// from its `/metrics`), by verb and resource, read before and after a run: what each
/// machine costs the server, in requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApiRequests(HashMap<(String, String), f64>);

/// The verbs that write.
const WRITE_VERBS: [&str; 5] = ["POST", "PUT", "PATCH", "APPLY", "DELETE"];

impl ApiRequests {
    /// Reads the counts from the test's API server.
    pub async fn read(env: &TestEnv) -> anyhow::Result<ApiRequests> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = env
            .client
            .request_text(request)
            .await
            .context("reading the API server's /metrics")?;
        Ok(ApiRequests::parse(&text))
    }

    /// Sums `apiserver_request_total` over response codes, keyed by verb and
    /// `resource[/subresource]`.
    pub fn parse(metrics: &str) -> ApiRequests {
        let mut counts: HashMap<(String, String), f64> = HashMap::new();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\""))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let resource = match label("subresource").as_str() {
                "" => label("resource"),
                sub => format!("{}/{sub}", label("resource")),
            };
            *counts.entry((label("verb"), resource)).or_default() += value;
        }
        ApiRequests(counts)
    }

    /// `writes per machine: W (verb resource n, …)` and the same for reads, from `self`
    /// to `after`, the largest first; requests below 0.01 per machine are left out.
    pub fn lines_until(&self, after: &ApiRequests, machines: usize) -> Vec<String> {
        let per = machines.max(1) as f64;
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        for ((verb, resource), end) in &after.0 {
            let start = self
                .0
                .get(&(verb.clone(), resource.clone()))
                .copied()
                .unwrap_or(0.0);
            let n = (end - start) / per;
            // Watches are long-lived; their count says nothing per machine.
            if n < 0.01 || verb == "WATCH" || verb == "CONNECT" {
                continue;
            }
            let into = if WRITE_VERBS.contains(&verb.as_str()) {
                &mut writes
            } else {
                &mut reads
            };
            into.push((n, format!("{verb} {resource}")));
        }
        [("writes", writes), ("reads", reads)]
            .into_iter()
            .map(|(kind, mut all)| {
                all.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                let total: f64 = all.iter().map(|(n, _)| n).sum();
                let parts: Vec<String> = all
                    .iter()
                    .map(|(n, what)| format!("{what} {n:.2}"))
                    .collect();
                format!(
                    "API server {kind} per machine: {total:.2} ({})",
                    parts.join(", ")
                )
            })
            .collect()
    }
}

/// Mean and percentiles of a set of latencies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    /// How many were measured.
    pub count: usize,
    /// Mean.
    pub mean: Duration,
    /// Median.
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// The slowest.
    pub max: Duration,
}

impl Latency {
    /// Per machine, from its apply's answer to its first Pod; machines missing from
    /// either map are left out. `None` when none is in both.
    pub fn between(
        applied: &HashMap<String, Instant>,
        seen: &HashMap<String, Instant>,
    ) -> Option<Latency> {
        let mut all: Vec<Duration> = applied
            .iter()
            .filter_map(|(name, at)| Some(seen.get(name)?.saturating_duration_since(*at)))
            .collect();
        Latency::of(&mut all)
    }

    /// The statistics of `samples` (sorted in place); `None` when empty.
    pub fn of(samples: &mut [Duration]) -> Option<Latency> {
        samples.sort();
        let count = samples.len();
        let rank = |p: usize| samples[(count * p).div_ceil(100).clamp(1, count) - 1];
        let total: Duration = samples.iter().sum();
        Some(Latency {
            count,
            mean: total / u32::try_from(count).ok().filter(|&c| c > 0)?,
            p50: rank(50),
            p99: rank(99),
            max: *samples.last()?,
        })
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mean {:.2} s, p50 {:.2} s, p99 {:.2} s, max {:.2} s over {}",
            self.mean.as_secs_f64(),
            self.p50.as_secs_f64(),
            self.p99.as_secs_f64(),
            self.max.as_secs_f64(),
            self.count
        )
    }
}

/// The lines of the operator's `/metrics` text that say where a placement's time goes:
/// the placement histogram's and each API call's sum and count, as `name{labels} mean`.
pub fn timing_lines(metrics: &str) -> Vec<String> {
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let mut sums: Vec<(String, f64)> = Vec::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    for line in metrics.lines() {
        for (suffix, is_sum) in [("_sum", true), ("_count", false)] {
            let Some((name, rest)) = line.split_once(suffix) else {
                continue;
            };
            if !(name.ends_with("placement_seconds") || name.ends_with("api_seconds")) {
                continue;
            }
            let labels = rest.rsplit_once(' ').map_or("", |(l, _)| l);
            let key = format!("{name}{labels}");
            if let Some(v) = value(line) {
                if is_sum {
                    sums.push((key, v));
                } else {
                    counts.insert(key, v);
                }
            }
        }
    }
    sums.into_iter()
        .filter_map(|(key, sum)| {
            let count = *counts.get(&key)?;
            (count > 0.0).then(|| {
                format!(
                    "{key}: {count} calls, mean {:.1} ms, total {sum:.1} s",
                    sum / count * 1e3
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_statistics_use_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&mut samples).unwrap();
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, Duration::from_millis(50));
        assert_eq!(l.p99, Duration::from_millis(99));
        assert_eq!(l.max, Duration::from_millis(100));
        assert_eq!(l.mean, Duration::from_micros(50_500));
        assert_eq!(Latency::of(&mut []), None);
        let one = Latency::of(&mut [Duration::from_secs(2)]).unwrap();
        assert_eq!(
            (one.p50, one.p99),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
    }

    #[test]
    fn latency_pairs_applies_with_pods_by_machine() {
        let t0 = Instant::now();
        let applied = HashMap::from([("a".to_owned(), t0), ("b".to_owned(), t0)]);
        let seen = HashMap::from([("a".to_owned(), t0 + Duration::from_secs(3))]);
        let l = Latency::between(&applied, &seen).unwrap();
        assert_eq!((l.count, l.max), (1, Duration::from_secs(3)));
    }

    #[test]
    fn timing_lines_give_the_mean_per_call() {
        let text = "# TYPE gpuvm_operator_api_seconds histogram\n\
            gpuvm_operator_api_seconds_sum{call=\"status\"} 2.0\n\
            gpuvm_operator_api_seconds_count{call=\"status\"} 4\n\
            gpuvm_operator_api_seconds_bucket{le=\"0.001\",call=\"status\"} 0\n\
            gpuvm_operator_placement_seconds_sum 1.5\n\
            gpuvm_operator_placement_seconds_count 3\n\
            gpuvm_operator_reconciles_total{kind=\"ok\"} 9\n";
        assert_eq!(
            timing_lines(text),
            vec![
                "gpuvm_operator_api_seconds{call=\"status\"}: 4 calls, mean 500.0 ms, total 2.0 s",
                "gpuvm_operator_placement_seconds: 3 calls, mean 500.0 ms, total 1.5 s",
            ]
        );
    }

    #[test]
    fn api_requests_count_writes_and_reads_per_machine() {
        let before = ApiRequests::parse(
            "apiserver_request_total{code=\"201\",component=\"apiserver\",resource=\"pods\",subresource=\"\",verb=\"POST\",version=\"v1\"} 10\n",
        );
        let after = ApiRequests::parse(
            "# HELP apiserver_request_total x\n\
             apiserver_request_total{code=\"201\",component=\"apiserver\",resource=\"pods\",subresource=\"\",verb=\"POST\",version=\"v1\"} 20\n\
             apiserver_request_total{code=\"409\",component=\"apiserver\",resource=\"pods\",subresource=\"\",verb=\"POST\",version=\"v1\"} 2\n\
             apiserver_request_total{code=\"200\",component=\"apiserver\",resource=\"gpumachines\",subresource=\"status\",verb=\"PUT\",version=\"v1alpha1\"} 10\n\
             apiserver_request_total{code=\"200\",component=\"apiserver\",resource=\"pods\",subresource=\"\",verb=\"GET\",version=\"v1\"} 5\n\
             apiserver_request_total{code=\"200\",component=\"apiserver\",resource=\"pods\",subresource=\"\",verb=\"WATCH\",version=\"v1\"} 7\n",
        );
        assert_eq!(
            before.lines_until(&after, 10),
            vec![
                "API server writes per machine: 2.20 (POST pods 1.20, PUT gpumachines/status 1.00)",
                "API server reads per machine: 0.50 (GET pods 0.50)",
            ]
        );
    }
}
