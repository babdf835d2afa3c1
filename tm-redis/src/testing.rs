//! Test support: a throwaway `redis-server` per test.
//!
//! [`TestServer`] starts `redis-server` from `PATH` on a free loopback port,
//! in its own temporary directory, with the append-only file on, waits until
//! it answers, and kills it when dropped. It can also be killed with SIGKILL
//! and started again on the same data directory and port, which is how the
//! crash tests check that a prepare survives.
//!
//! ```
//! use tm_redis::testing::TestServer;
//!
//! let mut server = TestServer::start();
//! let mut con = server.connection();
//! redis::cmd("SET").arg("k").arg("v").exec(&mut con)?;
//! drop(con);
//! server.kill_and_restart(); // SIGKILL, then the same dir and port
//! let v: String = redis::cmd("GET").arg("k").query(&mut server.connection())?;
//! assert_eq!(v, "v");
//! # Ok::<(), redis::RedisError>(())
//! ```

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a starting server may take to answer before [`TestServer`] gives up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Settings of a [`TestServer`], chosen before it starts.
///
/// ```
/// use tm_redis::testing::TestServer;
/// let server = TestServer::builder().fsync_always(true).start();
/// assert!(server.url().starts_with("redis://127.0.0.1:"));
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TestServerBuilder {
    fsync_always: bool,
    maxmemory: Option<u64>,
    replica_of: Option<u16>,
    extra: Vec<(String, String)>,
}

impl TestServerBuilder {
    /// `appendfsync always` (the durable setting) instead of `everysec`.
    pub fn fsync_always(mut self, on: bool) -> Self {
        self.fsync_always = on;
        self
    }

    /// `maxmemory` in bytes, with `maxmemory-policy noeviction`.
    pub fn maxmemory(mut self, bytes: u64) -> Self {
        self.maxmemory = Some(bytes);
        self
    }

    /// A replica of `primary` (`--replicaof`): [`start`](Self::start)
    /// returns once its link to the primary is up and the first sync is
    /// done.
    pub fn replica_of(mut self, primary: &TestServer) -> Self {
        self.replica_of = Some(primary.port);
        self
    }

    /// Any other `redis-server` option, as `--name value`.
    pub fn option(mut self, name: &str, value: &str) -> Self {
        self.extra.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Starts the server; panics (with the server's log) if it does not come up.
    pub fn start(self) -> TestServer {
        let dir = TempDir::new();
        let mut server = TestServer {
            dir,
            port: 0,
            child: None,
            settings: self,
        };
        // Another process may take the free port between our probe and the
        // server's bind: try a few ports.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn(true) {
                Ok(()) => {
                    if server.settings.replica_of.is_some() {
                        server.wait_for_primary();
                    }
                    return server;
                }
                Err(err) => last = err,
            }
        }
        panic!("could not start redis-server: {last}");
    }
}

/// A `redis-server` process of its own, killed on drop.
///
/// AOF is on (`appendfsync everysec`, or `always` with
/// [`TestServerBuilder::fsync_always`]); RDB snapshots are off.
#[derive(Debug)]
pub struct TestServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    settings: TestServerBuilder,
}

impl TestServer {
    /// Starts a server with the default settings (see [`TestServer::builder`]).
    pub fn start() -> TestServer {
        TestServerBuilder::default().start()
    }

    /// Settings for a server to start.
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder::default()
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The loopback port it listens on (the same after a restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory (holds the AOF and `redis.log`).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Whether the process is running (not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A plain connection, for looking at the data behind tm's back.
    pub fn connection(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).expect("test server url");
        client
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test server")
    }

    /// Stops the process with SIGSTOP: it holds its connections and
    /// answers nothing until [`resume`](Self::resume) (a hung server, or a
    /// replica that falls behind).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Continues a [`pause`](Self::pause)d process (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg(which)
                .arg(child.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {which} failed");
        }
    }

    /// Waits until a replica's link to its primary is up.
    fn wait_for_primary(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut con = self.connection();
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut con)
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica on port {} never linked to its primary: {info}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL (no shutdown, no final fsync) and waits
    /// for it to exit. The data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same directory and port; it loads its
    /// AOF. Panics if it does not come up.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(err) = self.spawn(true) {
            panic!("could not restart redis-server: {err}");
        }
    }

    /// Like [`restart`](Self::restart), but returns as soon as the server
    /// answers at all, while it may still be loading its AOF (replying
    /// `LOADING`). Use with the option `key-load-delay` (µs per key) to make
    /// loading last.
    pub fn restart_loading(&mut self) {
        self.kill();
        if let Err(err) = self.spawn(false) {
            panic!("could not restart redis-server: {err}");
        }
    }

    /// [`kill`](Self::kill) then [`restart`](Self::restart).
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// Starts the process; waits until it answers PONG (`loaded`), or any
    /// reply, `LOADING` included.
    fn spawn(&mut self, loaded: bool) -> Result<(), String> {
        let dir = self.dir.path.clone();
        let log = dir.join("redis.log");
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .arg("--daemonize")
            .arg("no")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg(if self.settings.fsync_always {
                "always"
            } else {
                "everysec"
            });
        if let Some(bytes) = self.settings.maxmemory {
            cmd.arg("--maxmemory")
                .arg(bytes.to_string())
                .arg("--maxmemory-policy")
                .arg("noeviction");
        }
        if let Some(port) = self.settings.replica_of {
            cmd.arg("--replicaof")
                .arg("127.0.0.1")
                .arg(port.to_string());
        }
        for (name, value) in &self.settings.extra {
            cmd.arg(format!("--{name}")).arg(value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("redis-server from PATH: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let client = redis::Client::open(self.url()).map_err(|e| e.to_string())?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "redis-server exited ({status}) on port {}: {stderr}{log}",
                    self.port
                ));
            }
            // LOADING (the AOF) is an error reply: wait for a real PONG.
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            let answered = match &pong {
                Ok(p) => p == "PONG",
                Err(e) => !loaded && e.code() == Some("LOADING"),
            };
            if answered {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis-server on port {} did not answer", self.port));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address").port()
}

/// A temporary directory removed on drop (no dependency for it).
#[derive(Debug)]
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("tm-redis-test-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
