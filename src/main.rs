//! `taskqueue-operator` CLI: `run` the controller, print the `crd`, read queue `depth`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use taskqueue_operator::broker::reader::{InFlight, ReadPlan};
use taskqueue_operator::broker::resp::Limits;
use taskqueue_operator::broker::unacked::{Streamed, Tags};
use taskqueue_operator::broker::{BrokerEndpoint, BrokerPool, DepthQuery};
use taskqueue_operator::controller::{self, Settings};
use taskqueue_operator::crd::{self, TransportOptions};
use taskqueue_operator::demand::classify;
use taskqueue_operator::leader::LeaseConfig;
use taskqueue_operator::routing;

/// jemalloc instead of glibc's malloc. At 10 000 TaskQueues glibc kept ~190 MiB resident for
/// ~100 MiB of live heap (arenas fragmented by the start; `malloc_trim` did not help); jemalloc
/// with one arena, handing freed pages back within a second, keeps it near 145 MiB
/// (docs/benchmarks.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read by jemalloc when it starts (`_RJEM_MALLOC_CONF` in the environment
/// still overrides them): one arena (two worker threads do not contend), freed pages returned
/// by a background thread after 1 s.
#[cfg(not(target_env = "msvc"))]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc can find by symbol name.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: it points to a static, immutable, NUL-terminated string.
unsafe impl Sync for MallocConf {}

#[derive(Parser)]
#[command(
    name = "taskqueue-operator",
    version,
    about = "Celery worker pools per queue on Kubernetes, scaled from the Redis broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (kubeconfig or in-cluster config, as kubectl finds it).
    Run {
        /// Watch only these namespaces, comma-separated or repeated (default: all namespaces).
        /// The operator then needs rights only there (the chart writes a Role in each).
        #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',', value_parser = parse_namespace)]
        namespaces: Vec<String>,
        /// Connect and reply timeout for broker reads, e.g. `2s`.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        broker_timeout: Duration,
        /// The most bytes one broker reply (or one pub/sub message) may have; a broker that
        /// sends more has that connection closed and its TaskQueues show BrokerReachable=False.
        #[arg(long, default_value_t = taskqueue_operator::broker::resp::DEFAULT_MAX_REPLY, value_parser = parse_bytes)]
        max_broker_reply: usize,
        /// Name of the per-namespace ConfigMap holding the Celery routing table.
        #[arg(long, default_value = "celery-task-routes")]
        routes_configmap: String,
        /// Log as JSON lines instead of text.
        #[arg(long, env = "LOG_JSON")]
        log_json: bool,
        /// Address for /metrics, /healthz and /readyz (in a pod: `0.0.0.0:8080`). On a loopback
        /// address it serves the live page (`/`, `/api/taskqueues`) too.
        #[arg(long, default_value = "127.0.0.1:8080")]
        metrics_addr: std::net::SocketAddr,
        /// Loopback address of the live page and its API when --metrics-addr is not loopback
        /// (in a pod: reach it with `kubectl port-forward`, which Kubernetes RBAC guards).
        #[arg(long, default_value = "127.0.0.1:8081", value_parser = parse_page_addr)]
        page_addr: std::net::SocketAddr,
        /// Leader election on the Lease `--lease-name`: only the leader reads brokers and writes.
        /// `--leader-election=false` for a single process run by hand.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// Namespace of the Lease (the chart sets POD_NAMESPACE to the release namespace).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Name of the Lease: one per installation (the chart uses the release's name), so two
        /// installations in one namespace do not share a leader.
        #[arg(long, default_value = taskqueue_operator::leader::DEFAULT_LEASE, value_parser = parse_lease_name)]
        lease_name: String,
        /// What a TaskQueue's podTemplate may ask beyond an ordinary pod, comma-separated:
        /// privileged, host-namespaces, host-path, run-as-root, service-account. Empty (the
        /// default): none of them; a TaskQueue asking one shows SpecValid=False naming the field.
        #[arg(long, default_value = "", value_parser = taskqueue_operator::pod_policy::PodPolicy::parse_allow)]
        pod_policy_allow: taskqueue_operator::pod_policy::PodPolicy,
        /// Broker addresses TaskQueues may name, comma-separated HOST:PORT rules (HOST: a name,
        /// `*.suffix`, an IP or CIDR, or `*`; PORT: a number or `*`), matched as written in the
        /// URL. Empty (the default): any address.
        #[arg(long, default_value = "", value_parser = taskqueue_operator::broker::allow::BrokerAllow::parse)]
        broker_allow: taskqueue_operator::broker::allow::BrokerAllow,
        /// Reconciles at once (each may hold an API connection; more only adds memory).
        #[arg(long, default_value_t = controller::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
    },
    /// Print the TaskQueue CustomResourceDefinition as YAML.
    Crd,
    /// One line per TaskQueue from its status: queue, pending, in-flight, scheduled,
    /// desired/ready, the last scale reason, and the conditions that are not OK.
    Status {
        /// Namespace (default: the kubeconfig context's).
        #[arg(long, short = 'n', conflicts_with = "all_namespaces")]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(long, short = 'A')]
        all_namespaces: bool,
    },
    /// Record pending, in-flight and replicas of a namespace's TaskQueues (from their status)
    /// until SIGINT/SIGTERM or `--seconds`, then draw them as an SVG timeline.
    Timeline {
        /// Namespace (default: the kubeconfig context's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Where to write the SVG.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Time between looks.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        every: Duration,
        /// Stop after this many seconds (default: at SIGINT/SIGTERM).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Exit 0 when an installation is up: its Lease holder renewed recently and is a Ready pod
    /// matching --selector (the chart's `helm test` runs this).
    Check {
        /// Namespace of the Lease and the operator's pods.
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        /// Name of the Lease (the chart: the release's name).
        #[arg(long, default_value = taskqueue_operator::leader::DEFAULT_LEASE)]
        lease: String,
        /// Label selector of the installation's operator pods.
        #[arg(long)]
        selector: String,
    },
    /// Print the Celery routing table (`task_routes.json`) the TaskQueues declare.
    Routes {
        #[command(flatten)]
        source: Source,
    },
    /// Print where each task name is routed: TASK<TAB>QUEUE<TAB>MATCHED_PATTERN (or -).
    Route {
        #[command(flatten)]
        source: Source,
        /// Queue for tasks no route matches (Celery's task_default_queue).
        #[arg(long, default_value = routing::DEFAULT_QUEUE)]
        default_queue: String,
        /// Task names (after `--` they may start with `-`).
        #[arg(required = true)]
        tasks: Vec<String>,
    },
    /// Read the broker once and print one JSON line per queue: pending messages by priority,
    /// in-flight (unacked) messages, and unacked ETA/countdown tasks due beyond the horizon
    /// (`scheduled`, not demand).
    Depth {
        /// Celery broker URL (redis://, rediss:// or sentinel://).
        #[arg(long, env = "CELERY_BROKER_URL", hide_env_values = true)]
        broker_url: String,
        /// kombu `master_name` (Sentinel master), for sentinel:// URLs.
        #[arg(long)]
        master_name: Option<String>,
        /// PEM CA bundle that signed a rediss:// broker's certificate.
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
        /// Queue to measure (repeat for more).
        #[arg(long = "queue", required = true)]
        queues: Vec<String>,
        /// kombu `global_keyprefix`.
        #[arg(long, default_value = "")]
        key_prefix: String,
        /// kombu `priority_steps`, comma separated.
        #[arg(long, default_value = "0,3,6,9", value_delimiter = ',')]
        priority_steps: Vec<u8>,
        /// kombu `sep` (default: the two bytes 0x06 0x16).
        #[arg(long, default_value = crd::DEFAULT_SEP, hide_default_value = true)]
        sep: String,
        /// Unacked tasks with an ETA further away than this are `scheduled` (as
        /// `spec.scaling.etaHorizon`).
        #[arg(long, default_value = "30s", value_parser = parse_horizon)]
        eta_horizon: Duration,
    },
}

fn parse_horizon(s: &str) -> Result<Duration, String> {
    taskqueue_operator::validate::parse_duration_str(s).map_err(|e| format!("{e}; e.g. 30s, 2m"))
}

/// Where TaskQueues come from: manifest files/directories, or the cluster.
#[derive(clap::Args)]
struct Source {
    /// TaskQueue manifests: files or directories of multi-document YAML (repeatable).
    #[arg(short = 'f', long = "filename", required_unless_present = "cluster")]
    files: Vec<std::path::PathBuf>,
    /// Read the TaskQueues from the cluster instead (kubeconfig or in-cluster config).
    #[arg(long, conflicts_with = "files")]
    cluster: bool,
    /// With --cluster: one namespace (default: all).
    #[arg(long, short = 'n', requires = "cluster")]
    namespace: Option<String>,
}

impl Source {
    async fn load(&self) -> Result<Vec<crd::TaskQueue>, String> {
        if !self.cluster {
            return taskqueue_operator::manifests::load(&self.files);
        }
        let client = kube::Client::try_default().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?;
        let api: kube::Api<crd::TaskQueue> = match &self.namespace {
            Some(ns) => kube::Api::namespaced(client, ns),
            None => kube::Api::all(client),
        };
        Ok(api.list(&Default::default()).await.map_err(|e| format!("listing TaskQueues: {e}"))?.items)
    }
}

/// The table for `source`, with rejected routes reported on stderr.
async fn table(source: &Source) -> Result<routing::Table, String> {
    let tqs = source.load().await?;
    let mut namespaces: Vec<Option<String>> = tqs.iter().map(|t| t.metadata.namespace.clone()).collect();
    namespaces.dedup();
    if namespaces.len() > 1 {
        return Err("TaskQueues from several namespaces: each namespace has its own table; pass --namespace".into());
    }
    let table = routing::build_table(&tqs);
    for r in &table.rejected {
        eprintln!("warning: route {:?} of TaskQueue {} left out: {}", r.pattern, r.object, r.reason);
    }
    Ok(table)
}

async fn status(namespace: Option<String>, all_namespaces: bool) -> Result<String, String> {
    let client = kube::Client::try_default().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    let api: kube::Api<crd::TaskQueue> = if all_namespaces {
        kube::Api::all(client)
    } else {
        let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
        kube::Api::namespaced(client, &ns)
    };
    let mut tqs = api.list(&Default::default()).await.map_err(|e| format!("listing TaskQueues: {e}"))?.items;
    tqs.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
    Ok(taskqueue_operator::report::status_table(&tqs, all_namespaces))
}

/// `timeline`: look every `every` until stopped, then draw. A failed look is skipped (the API
/// server may be busy); the drawing is written also when nothing was recorded.
async fn timeline(
    namespace: Option<String>,
    out: &std::path::Path,
    every: Duration,
    seconds: Option<u64>,
) -> Result<String, String> {
    let client = kube::Client::try_default().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let api: kube::Api<crd::TaskQueue> = kube::Api::namespaced(client, &ns);
    let mut recorder = taskqueue_operator::timeline::Recorder::default();
    let started = std::time::Instant::now();
    let until = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => futures::future::pending().await,
        }
    };
    let stop = async {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = until => {}
        }
    };
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                if let Ok(list) = api.list(&Default::default()).await {
                    recorder.record(started.elapsed().as_secs_f64(), &list.items);
                }
            }
        }
    }
    let title = format!("TaskQueues of namespace {ns}: pending, in flight and replicas");
    std::fs::write(out, taskqueue_operator::timeline::svg(&title, &recorder.pools))
        .map_err(|e| format!("writing {}: {e}", out.display()))?;
    let samples: usize = recorder.pools.values().map(|p| p.samples.len()).sum();
    Ok(format!("timeline of {} TaskQueue(s), {samples} samples: {}", recorder.pools.len(), out.display()))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    taskqueue_operator::validate::parse_duration_str(s)
}

/// A namespace name (`""` is left out: an empty WATCH_NAMESPACE means all).
fn parse_namespace(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || taskqueue_operator::validate::dns_label(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"))
    }
}

/// A byte count: `4194304`, `512Ki`, `4Mi` (Kubernetes' binary suffixes), at least 1 KiB.
/// The page's address: loopback only (see `http`).
fn parse_page_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr = s.parse().map_err(|e| format!("{s:?}: {e} (e.g. 127.0.0.1:8081)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{s:?} is not a loopback address: the page shows every watched namespace's TaskQueues and is served on \
             loopback only; use 127.0.0.1:PORT and kubectl port-forward"
        ));
    }
    Ok(addr)
}

/// A Lease name: a DNS subdomain (lower-case letters, digits, '-' and '.', at most 253).
fn parse_lease_name(s: &str) -> Result<String, String> {
    taskqueue_operator::validate::dns_subdomain(s).then(|| s.to_string()).ok_or_else(|| {
        format!("{s:?} is not a Lease name: lower-case letters, digits, '-' and '.', at most 253, starting and ending alphanumeric")
    })
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let factor: usize = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(format!("{s:?}: expected bytes, optionally with Ki, Mi or Gi (e.g. 4Mi)")),
    };
    let n: usize = digits.parse().map_err(|_| format!("{s:?}: expected a number of bytes (e.g. 4Mi)"))?;
    n.checked_mul(factor).filter(|b| *b >= 1024).ok_or_else(|| format!("{s:?}: must be between 1Ki and 2^64 bytes"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Status { namespace, all_namespaces } => match status(namespace, all_namespaces).await {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Check { namespace, lease, selector } => {
            match taskqueue_operator::install_check::check(&namespace, &lease, &selector).await {
                Ok(summary) => {
                    println!("ok: {summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Timeline { namespace, out, every, seconds } => match timeline(namespace, &out, every, seconds).await {
            Ok(done) => {
                eprintln!("{done}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Routes { source } => match table(&source).await {
            Ok(t) => {
                println!("{}", t.to_json());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Route { source, default_queue, tasks } => {
            let router = match table(&source).await.and_then(|t| routing::Router::new(&t.entries, &default_queue)) {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            for task in tasks {
                let d = router.route(&task);
                println!("{task}\t{}\t{}", d.queue, d.pattern.as_deref().unwrap_or("-"));
            }
            ExitCode::SUCCESS
        }
        Command::Depth { broker_url, master_name, ca_file, queues, key_prefix, priority_steps, sep, eta_horizon } => {
            let opts = TransportOptions { global_keyprefix: key_prefix, priority_steps, sep, master_name };
            match depth(&broker_url, ca_file.as_deref(), &queues, &opts, eta_horizon).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            namespaces,
            broker_timeout,
            max_broker_reply,
            routes_configmap,
            log_json,
            metrics_addr,
            page_addr,
            leader_election,
            lease_namespace,
            lease_name,
            pod_policy_allow,
            broker_allow,
            concurrency,
        } => {
            init_tracing(log_json);
            let client = match kube::Client::try_default().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "no Kubernetes configuration found (KUBECONFIG, ~/.kube/config or in-cluster)");
                    return ExitCode::FAILURE;
                }
            };
            let listener = match taskqueue_operator::http::bind(metrics_addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen on {metrics_addr} for /metrics; pick another --metrics-addr");
                    return ExitCode::FAILURE;
                }
            };
            let leader = leader_election.then(|| LeaseConfig::named(&lease_namespace, &lease_name, &identity()));
            let broker_limits = Limits { max_reply: max_broker_reply, ..Limits::default() };
            let settings = Settings {
                namespaces: namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
                broker_timeout,
                broker_limits,
                routes_configmap,
                leader,
                concurrency,
                pod_policy: pod_policy_allow,
                broker_allow,
                status_manager: taskqueue_operator::controller::installations::status_manager(
                    &lease_namespace,
                    &lease_name,
                ),
                ..Settings::default()
            };
            // The page on its own loopback listener unless the metrics one is loopback already.
            let page = if metrics_addr.ip().is_loopback() {
                None
            } else {
                match taskqueue_operator::http::bind(page_addr).await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen on {page_addr} for the live page; pick another --page-addr");
                        return ExitCode::FAILURE;
                    }
                }
            };
            let (metrics, dashboard) = (settings.metrics.clone(), settings.dashboard.clone());
            let mut server = tokio::spawn(async move {
                let serve = |l| taskqueue_operator::http::serve(l, metrics.clone(), dashboard.clone());
                match page {
                    Some(page) => tokio::join!(serve(listener), serve(page)).0,
                    None => serve(listener).await,
                }
            });
            // A dead background task (or metrics server) ends the process with an error, so the
            // pod restarts instead of running on with stale readings.
            let outcome = tokio::select! {
                r = controller::run(client, settings, shutdown_signal()) => r.map_err(|e| e.to_string()),
                r = &mut server => Err(format!("the /metrics server stopped: {r:?}")),
            };
            server.abort();
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn depth(
    url: &str,
    ca_file: Option<&std::path::Path>,
    queues: &[String],
    opts: &TransportOptions,
    horizon: Duration,
) -> Result<(), String> {
    let ca = match ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("--ca-file {}: {e}", p.display()))?),
        None => None,
    };
    let endpoint = BrokerEndpoint::resolve(url, opts.master_name.as_deref(), ca).map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(5);
    let pool = BrokerPool::new(timeout);
    let (mut conn, addr) = pool.connection_at(&endpoint).await.map_err(|e| e.to_string())?;
    let queries: Vec<DepthQuery> = queues.iter().map(|q| DepthQuery::new(q, opts)).collect();
    // Values of unacked messages stream past; only their ends are kept (see broker::unacked).
    let (mut tags, mut bodies) = (Tags::default(), Streamed::new(endpoint.clone(), addr, timeout, Default::default()));
    let in_flight =
        InFlight { tags: &mut tags, bodies: Some(&mut bodies), budget: Duration::from_secs(60), holders: None };
    let shown = endpoint.to_string();
    let read = ReadPlan::new(queries).read(&mut conn, &shown, in_flight).await;
    let depths = match read {
        Ok(depths) => depths,
        Err(e) => return Err(pool.explain(&endpoint, e).await.to_string()),
    };
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let mut failed = None;
    for (q, d) in queues.iter().zip(depths) {
        match d {
            Ok(d) => {
                let unacked = classify(&d, now_ms, horizon);
                let line = DepthLine {
                    queue: q,
                    pending: d.pending,
                    by_priority: d.by_priority.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
                    in_flight: unacked.due,
                    scheduled: unacked.scheduled,
                };
                println!("{}", serde_json::to_string(&line).expect("serializes"));
            }
            Err(e) => failed = Some(format!("queue {q}: {e}")),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// One `depth` output line; fields in the documented order.
#[derive(serde::Serialize)]
struct DepthLine<'a> {
    queue: &'a str,
    pending: i64,
    #[serde(rename = "byPriority")]
    by_priority: std::collections::BTreeMap<String, i64>,
    #[serde(rename = "inFlight")]
    in_flight: i64,
    scheduled: i64,
}

/// Who holds the Lease: the pod's name in a cluster (unique per replica), else host and pid.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    })
}

fn fail(e: String) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

fn init_tracing(json: bool) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    if json {
        fmt().with_env_filter(filter).json().init();
    } else {
        fmt().with_env_filter(filter).init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
