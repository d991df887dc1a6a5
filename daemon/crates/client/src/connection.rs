//! Connections to the gateway's Redis, the same for every program that
//! talks to it: reconnecting, multiplexed, with timeouts, over TLS when the
//! URL says `rediss://` (with the system's trust store, or a CA file and a
//! client certificate: [`Endpoint`]), to one Redis or to the master that
//! Redis Sentinel names, followed across failovers ([`Connection`]): after
//! a command failed the way a failover explains, and as soon as the
//! sentinels announce a new master (`+switch-master`, watched by
//! `switch_watch`).

use arc_swap::ArcSwap;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, IntoConnectionInfo as _, RedisError, RedisFuture, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

mod switch_watch;

/// Where the gateway's Redis is and how to trust it: a URL, and for TLS
/// (`rediss://`) optionally the CA that signed the server's certificate and
/// a client certificate. Built once, cloned into every connection.
#[derive(Clone)]
pub struct Endpoint {
    /// `redis://`, `rediss://` or `unix://` URL.
    url: String,
    /// PEM files read at start; `None`: the system's trust store, no client
    /// certificate.
    tls: Option<Arc<TlsFiles>>,
    /// Set when the master is found through Redis Sentinel: `url` then
    /// gives the master's credentials, database and scheme, not its address.
    sentinel: Option<Arc<SentinelNodes>>,
    /// The `+switch-master` watcher of the connections made from this
    /// endpoint and its clones, while one of them lives.
    switch_watch: Arc<std::sync::Mutex<Weak<switch_watch::SwitchWatch>>>,
}

/// The sentinels that know where the master is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelNodes {
    /// The name the sentinels monitor the master under (`sentinel monitor
    /// <name> ...`).
    pub master_name: String,
    /// `redis://host:port` (or `rediss://`) of each sentinel, with the
    /// sentinels' own user name and password when they ask for one.
    pub nodes: Vec<String>,
}

/// The PEM contents of the TLS files of an [`Endpoint`].
struct TlsFiles {
    /// CA certificates that may sign the server's (instead of the system's).
    ca: Option<Vec<u8>>,
    /// Client certificate chain and key, for servers that ask for one.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

/// The files of a TLS connection, as the configuration names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPaths {
    /// PEM file of the CA(s) to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

/// A TLS file that cannot be used: which, and why.
#[derive(Debug, thiserror::Error)]
#[error("{which} {path}: {reason}")]
pub struct TlsFileError {
    /// `ca_file`, `cert_file` or `key_file`.
    pub which: &'static str,
    /// The file as configured.
    pub path: PathBuf,
    /// What was wrong with it (unreadable, not PEM, no key in it, ...).
    pub reason: String,
}

impl Endpoint {
    /// The Redis at `url`, trusted by the system's certificates when it is
    /// `rediss://`.
    pub fn new(url: impl Into<String>) -> Self {
        Endpoint {
            url: url.into(),
            tls: None,
            sentinel: None,
            switch_watch: Arc::default(),
        }
    }

    /// This endpoint's master as Redis Sentinel names it: the URL's user
    /// name, password, database and scheme (`rediss://`: TLS, with this
    /// endpoint's files) are the master's; its host and port are not used.
    pub fn through_sentinel(mut self, sentinel: SentinelNodes) -> Self {
        self.sentinel = Some(Arc::new(sentinel));
        // Not the watcher of the sentinels this was cloned with.
        self.switch_watch = Arc::default();
        self
    }

    /// The sentinels, when the master is found through them.
    pub fn sentinel(&self) -> Option<&SentinelNodes> {
        self.sentinel.as_deref()
    }

    /// Where this endpoint connects, as logs and errors may show it (no
    /// password): the URL, or the master's name and its sentinels.
    pub fn shown(&self) -> String {
        match &self.sentinel {
            None => redact_password(&self.url),
            Some(sentinel) => {
                let nodes: Vec<String> =
                    sentinel.nodes.iter().map(|n| redact_password(n)).collect();
                format!(
                    "master {} of sentinels {}",
                    sentinel.master_name,
                    nodes.join(",")
                )
            }
        }
    }

    /// The Redis at `url` with these TLS files (read now). Without any file
    /// it is [`Endpoint::new`].
    pub fn with_tls(url: impl Into<String>, paths: &TlsPaths) -> Result<Self, TlsFileError> {
        let read = |which: &'static str, path: &Path| {
            let bytes = std::fs::read(path).map_err(|e| TlsFileError {
                which,
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(TlsFileError {
                    which,
                    path: path.to_owned(),
                    reason: "is not a PEM file (no -----BEGIN line)".into(),
                });
            }
            Ok(bytes)
        };
        let ca = paths
            .ca_file
            .as_deref()
            .map(|p| read("ca_file", p))
            .transpose()?;
        let client = match (&paths.cert_file, &paths.key_file) {
            (Some(cert), Some(key)) => Some((read("cert_file", cert)?, read("key_file", key)?)),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(TlsFileError {
                    which: "key_file",
                    path: cert.clone(),
                    reason: "a client certificate needs its key_file".into(),
                });
            }
            (None, Some(key)) => {
                return Err(TlsFileError {
                    which: "cert_file",
                    path: key.clone(),
                    reason: "a client key needs its cert_file".into(),
                });
            }
        };
        let tls = (ca.is_some() || client.is_some()).then(|| Arc::new(TlsFiles { ca, client }));
        Ok(Endpoint {
            url: url.into(),
            tls,
            sentinel: None,
            switch_watch: Arc::default(),
        })
    }

    /// The URL (with its password: never log it; see [`redact_password`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of this endpoint.
    pub fn client(&self) -> Result<redis::Client, redis::RedisError> {
        if self.url.starts_with("rediss://") {
            // rustls picks its provider from crate features; make the choice
            // explicit so that another crate enabling a second one cannot
            // make it ambiguous.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        match &self.tls {
            None => redis::Client::open(self.url.as_str()),
            Some(files) => redis::Client::build_with_tls(self.url.as_str(), files.certificates()),
        }
    }

    /// How to reach the sentinels of `sentinel`: their addresses, their
    /// own credentials and, when every one is `rediss://`, this endpoint's
    /// TLS files.
    fn sentinel_access(&self, sentinel: &SentinelNodes) -> Result<SentinelAccess, RedisError> {
        let mut addresses = Vec::with_capacity(sentinel.nodes.len());
        let mut auth = None;
        for node in &sentinel.nodes {
            let info = node.as_str().into_connection_info()?;
            let settings = info.redis_settings();
            if auth.is_none() && settings.password().is_some() {
                auth = Some((
                    settings.username().map(str::to_owned),
                    settings.password().unwrap_or_default().to_owned(),
                ));
            }
            addresses.push(info.addr().clone());
        }
        let all_tls = addresses
            .iter()
            .all(|addr| matches!(addr, redis::ConnectionAddr::TcpTls { .. }));
        Ok(SentinelAccess {
            addresses,
            auth,
            tls: self.tls.clone().filter(|_| all_tls),
        })
    }

    /// A client of the sentinels that finds the master for `sentinel`,
    /// connecting to it as the URL says (credentials, database, TLS).
    fn sentinel_client(
        &self,
        sentinel: &SentinelNodes,
        access: &SentinelAccess,
    ) -> Result<SentinelClient, RedisError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let master = self.url.as_str().into_connection_info()?;
        let settings = master.redis_settings();
        let mut builder = SentinelClientBuilder::new(
            access.addresses.clone(),
            &sentinel.master_name,
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(settings.db());
        if let Some(user) = settings.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if matches!(master.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(files) = &self.tls {
                builder = builder.set_client_to_redis_certificates(files.certificates());
            }
        }
        if let Some((user, password)) = &access.auth {
            if let Some(user) = user {
                builder = builder.set_client_to_sentinel_username(user);
            }
            builder = builder.set_client_to_sentinel_password(password);
        }
        if let Some(files) = &access.tls {
            builder = builder.set_client_to_sentinel_certificates(files.certificates());
        }
        builder.build()
    }
}

/// How to reach the sentinels themselves, shared by the search for the
/// master and the `+switch-master` watcher so that both reach them alike.
struct SentinelAccess {
    /// Each sentinel's address, TLS or not as its URL says.
    addresses: Vec<redis::ConnectionAddr>,
    /// The sentinels' user name and password: those of the first URL that
    /// gives a password (redis-rs takes one pair for every sentinel).
    auth: Option<(Option<String>, String)>,
    /// The endpoint's CA and client certificate, used when every sentinel
    /// is `rediss://` (a mixed list gets the system's trust store).
    tls: Option<Arc<TlsFiles>>,
}

impl SentinelAccess {
    /// A client of each sentinel, in the configured order, for the
    /// watcher's subscriptions.
    fn node_clients(&self) -> Result<Vec<redis::Client>, RedisError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some((user, password)) = &self.auth {
            if let Some(user) = user {
                settings = settings.set_username(user);
            }
            settings = settings.set_password(password);
        }
        self.addresses
            .iter()
            .map(|address| {
                let info = address
                    .clone()
                    .into_connection_info()?
                    .set_redis_settings(settings.clone());
                match (&self.tls, address) {
                    (Some(files), redis::ConnectionAddr::TcpTls { .. }) => {
                        redis::Client::build_with_tls(info, files.certificates())
                    }
                    _ => redis::Client::open(info),
                }
            })
            .collect()
    }
}

impl TlsFiles {
    /// The files as redis-rs takes them.
    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("at", &self.shown())
            .field("tls_files", &self.tls.is_some())
            .finish()
    }
}

impl From<&str> for Endpoint {
    fn from(url: &str) -> Self {
        Endpoint::new(url)
    }
}

impl From<String> for Endpoint {
    fn from(url: String) -> Self {
        Endpoint::new(url)
    }
}

impl From<&String> for Endpoint {
    fn from(url: &String) -> Self {
        Endpoint::new(url.as_str())
    }
}

impl From<&Endpoint> for Endpoint {
    fn from(endpoint: &Endpoint) -> Self {
        endpoint.clone()
    }
}

/// Opens a reconnecting, multiplexed connection. `response_timeout` must
/// exceed the BLOCK time of any blocking read made on it.
pub async fn connect(
    endpoint: impl Into<Endpoint>,
    response_timeout: Duration,
) -> Result<Connection, RedisError> {
    let endpoint = endpoint.into();
    if let Some(sentinel) = endpoint.sentinel.clone() {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(CONNECTION_TIMEOUT));
        let follower = SentinelFollower::connect(&endpoint, &sentinel, config).await?;
        return Ok(Connection(Route::Sentinel(follower)));
    }
    let client = endpoint.client()?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_number_of_retries(6)
        .set_max_delay(Duration::from_secs(2));
    let mut connection = Connection(Route::Direct(
        ConnectionManager::new_with_config(client, config).await?,
    ));
    refuse_cluster(&mut connection).await?;
    Ok(connection)
}

/// Refuses a Redis Cluster node: in cluster mode Redis answers MOVED for
/// keys of other nodes and CROSSSLOT for transactions and scripts over
/// keys of several slots (even when one node holds every slot), which the
/// gateway's writes are. Better a clear error at start than failing
/// writes. A user whose ACL forbids INFO is not checked.
async fn refuse_cluster(connection: &mut Connection) -> Result<(), RedisError> {
    let info: Result<String, RedisError> = redis::cmd("INFO")
        .arg("cluster")
        .query_async(connection)
        .await;
    if info.is_ok_and(|info| info.contains("cluster_enabled:1")) {
        return Err(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "Redis Cluster is not supported",
            "this Redis runs in cluster mode (cluster_enabled:1); the gateway speaks to one Redis, \
             or to the master Redis Sentinel names (redis.sentinel_master)"
                .to_owned(),
        )));
    }
    Ok(())
}

/// How long opening a connection (and asking the sentinels) may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Least time between two searches for the master: commands failing on
/// and on (a master out of memory refusing every transaction, a dead one
/// the sentinels still name) ask the sentinels at most this often.
const SEARCH_INTERVAL: Duration = Duration::from_millis(200);

/// How long, after a `+switch-master`, the sentinels are asked again while
/// they still name the master they announced replaced (one of them may not
/// have heard of the switch yet: they tell each other every 2 s).
const SWITCH_FOLLOW_TIME: Duration = Duration::from_secs(10);

/// A connection to the gateway's Redis: cheap to clone (clones share it),
/// multiplexed, reconnecting. To one Redis it is redis-rs'
/// `ConnectionManager`; through Sentinel it asks the sentinels for the
/// master again when a command fails in a way a failover explains (the
/// connection dropped or timed out, `READONLY` from a demoted master,
/// `MASTERDOWN`, `LOADING`, an aborted transaction) and moves to the new
/// one. Either way the failing command returns its error: callers retry as
/// they do across any reconnect. It also moves, without any command
/// failing, when the sentinels announce that they replaced the master
/// (`+switch-master`): a master cut off from them but not from us answers
/// every command, and what it takes is lost when it is later demoted.
#[derive(Clone)]
pub struct Connection(Route);

/// What a [`Connection`] talks to.
#[derive(Clone)]
enum Route {
    /// One Redis, reconnected to the same address.
    Direct(ConnectionManager),
    /// The master the sentinels name.
    Sentinel(Arc<SentinelFollower>),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Route::Direct(_) => f.write_str("Connection(direct)"),
            Route::Sentinel(follower) => f
                .debug_struct("Connection")
                .field("master_name", &follower.master_name)
                .field("master", &follower.current.load().address)
                .finish(),
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Route::Direct(manager) => manager.req_packed_command(cmd),
            Route::Sentinel(follower) => Box::pin(async move {
                let master = follower.current.load_full();
                let result = master.connection.clone().req_packed_command(cmd).await;
                if let Err(error) = &result {
                    follower.after_error(master.generation, error).await;
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Route::Direct(manager) => manager.req_packed_commands(pipeline, offset, count),
            Route::Sentinel(follower) => Box::pin(async move {
                let master = follower.current.load_full();
                let result = master
                    .connection
                    .clone()
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                if let Err(error) = &result {
                    follower.after_error(master.generation, error).await;
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Route::Direct(manager) => manager.get_db(),
            Route::Sentinel(follower) => follower.current.load().connection.get_db(),
        }
    }
}

/// The master Redis Sentinel names, and the connection to it.
struct SentinelFollower {
    /// The name the sentinels know the master by (for logs).
    master_name: String,
    /// Asks the sentinels; the lock also makes searches one at a time.
    sentinels: tokio::sync::Mutex<SentinelSearch>,
    /// Timeouts of the connection to the master.
    config: AsyncConnectionConfig,
    /// The master connected to now; replaced whole when it changes.
    current: ArcSwap<Master>,
    /// The `+switch-master` watcher, shared with the other connections of
    /// the endpoint; it stops when the last of them goes (it holds only a
    /// `Weak` of each follower).
    _switch_watch: Arc<switch_watch::SwitchWatch>,
}

/// The sentinels' client and when it last asked them.
struct SentinelSearch {
    /// Finds the master and checks that it says it is one (`ROLE`).
    client: SentinelClient,
    /// End of the last search.
    searched_at: Option<Instant>,
}

/// One master and the connection to it.
struct Master {
    /// Counts the masters connected to, so that of many commands failing on
    /// one connection only the first replaces it.
    generation: u64,
    /// `host:port`, for logs and to tell whether the master moved.
    address: String,
    /// The multiplexed connection every command goes through; dropped
    /// with the last command still running on it once the master changed.
    connection: MultiplexedConnection,
}

impl SentinelFollower {
    /// Finds the master, connects to it, and starts the watcher of the
    /// sentinels' `+switch-master` announcements.
    async fn connect(
        endpoint: &Endpoint,
        sentinel: &SentinelNodes,
        config: AsyncConnectionConfig,
    ) -> Result<Arc<Self>, RedisError> {
        let access = endpoint.sentinel_access(sentinel)?;
        let mut client = endpoint.sentinel_client(sentinel, &access)?;
        let (address, connection) = Self::find_master(&mut client, &config).await?;
        let switch_watch = switch_watch::SwitchWatch::get_or_start(
            &endpoint.switch_watch,
            &sentinel.master_name,
            || access.node_clients(),
        )?;
        let follower = Arc::new(SentinelFollower {
            master_name: sentinel.master_name.clone(),
            sentinels: tokio::sync::Mutex::new(SentinelSearch {
                client,
                searched_at: None,
            }),
            config,
            current: ArcSwap::from_pointee(Master {
                generation: 0,
                address,
                connection,
            }),
            _switch_watch: switch_watch.clone(),
        });
        switch_watch.add(&follower);
        Ok(follower)
    }

    /// Asks the sentinels for the master and connects to it.
    async fn find_master(
        client: &mut SentinelClient,
        config: &AsyncConnectionConfig,
    ) -> Result<(String, MultiplexedConnection), RedisError> {
        let search = async {
            let master = client.async_get_client().await?;
            let address = master.get_connection_info().addr().to_string();
            let connection = master
                .get_multiplexed_async_connection_with_config(config)
                .await?;
            Ok::<_, RedisError>((address, connection))
        };
        tokio::time::timeout(2 * CONNECTION_TIMEOUT, search)
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "the sentinels did not name a reachable master in time",
                )))
            })
    }

    /// After a command on master `generation` failed: when the failure
    /// could be a failover, asks the sentinels where the master is and
    /// moves there (once for all the commands that failed on it).
    async fn after_error(&self, generation: u64, error: &RedisError) {
        let dropped = error.is_io_error() || error.is_connection_dropped() || error.is_timeout();
        let topology = matches!(
            error.code(),
            Some("READONLY" | "MASTERDOWN" | "LOADING" | "EXECABORT")
        );
        if !dropped && !topology {
            return;
        }
        let mut search = self.sentinels.lock().await;
        let current = self.current.load();
        if current.generation != generation {
            return; // Another command already moved on.
        }
        if search
            .searched_at
            .is_some_and(|at| at.elapsed() < SEARCH_INTERVAL)
        {
            return;
        }
        let found = Self::find_master(&mut search.client, &self.config).await;
        search.searched_at = Some(Instant::now());
        match found {
            Ok((address, _)) if address == current.address && !dropped => {
                // The same master, and the connection is fine: the error
                // was the command's own (out of memory, loading).
            }
            Ok((address, connection)) => {
                if address != current.address {
                    tracing::info!(
                        master_name = %self.master_name,
                        from = %current.address,
                        to = %address,
                        "redis: following the master sentinel names"
                    );
                }
                self.current.store(Arc::new(Master {
                    generation: generation + 1,
                    address,
                    connection,
                }));
            }
            Err(search_error) => {
                tracing::warn!(
                    master_name = %self.master_name,
                    master = %current.address,
                    error = %search_error,
                    "redis: no master found through the sentinels yet"
                );
            }
        }
    }

    /// After the sentinels announced that they replaced the master at
    /// `replaced` (`+switch-master`), or after the watcher could not hear
    /// them for a while (`None`: a switch may have gone unheard): asks them
    /// where the master is and moves there if it is not where we are.
    /// Nothing failed here, so the connection is kept when they name the
    /// master we are on. After an announcement, a sentinel that has not
    /// heard of the switch yet may still name the replaced master, or none
    /// be reachable: they are asked again, paced, for
    /// [`SWITCH_FOLLOW_TIME`]; after it, failing commands are left to move
    /// us.
    async fn follow_switch(&self, replaced: Option<&str>) {
        let deadline = Instant::now() + SWITCH_FOLLOW_TIME;
        loop {
            let mut search = self.sentinels.lock().await;
            let current = self.current.load_full();
            if replaced.is_some_and(|replaced| replaced != current.address) {
                return; // Not on the replaced master (or no longer).
            }
            // Paced as after errors, but waited out rather than skipped: a
            // search made just before the switch does not stand for one after.
            if let Some(at) = search.searched_at {
                tokio::time::sleep(SEARCH_INTERVAL.saturating_sub(at.elapsed())).await;
            }
            let found = Self::find_master(&mut search.client, &self.config).await;
            search.searched_at = Some(Instant::now());
            // The master is replaced while the lock is held, as after an
            // error: a search of theirs cannot slip in between.
            let why_not = match found {
                Ok((address, connection)) if address != current.address => {
                    tracing::info!(
                        master_name = %self.master_name,
                        from = %current.address,
                        to = %address,
                        "redis: following the master the sentinels switched to"
                    );
                    self.current.store(Arc::new(Master {
                        generation: current.generation + 1,
                        address,
                        connection,
                    }));
                    return;
                }
                Ok((address, _)) if Some(address.as_str()) != replaced => {
                    return; // Already on the master they name.
                }
                Ok(_) => "a sentinel still names the replaced master".to_owned(),
                Err(search_error) => search_error.to_string(),
            };
            drop(search);
            if replaced.is_none() || Instant::now() >= deadline {
                tracing::warn!(
                    master_name = %self.master_name,
                    master = %current.address,
                    error = %why_not,
                    "redis: could not check the master the sentinels name; staying until a command fails"
                );
                return;
            }
            tracing::debug!(
                master_name = %self.master_name,
                master = %current.address,
                error = %why_not,
                "redis: no other master named after a switch yet; asking again"
            );
        }
    }
}

/// The URL as logs and errors may show it: a password becomes `***`.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials
                .split_once(':')
                .map_or(credentials, |(user, _)| user);
            if credentials.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{Endpoint, SentinelNodes, redact_password};

    #[test]
    fn endpoints_show_no_password_in_logs_or_errors() {
        let endpoint =
            Endpoint::new("redis://:master-pw@127.0.0.1:6379/0").through_sentinel(SentinelNodes {
                master_name: "gateway".into(),
                nodes: vec![
                    "redis://:sentinel-pw@10.0.0.1:26379".into(),
                    "redis://10.0.0.2:26379".into(),
                ],
            });
        assert_eq!(
            endpoint.shown(),
            "master gateway of sentinels redis://:***@10.0.0.1:26379,redis://10.0.0.2:26379"
        );
        let debug = format!("{endpoint:?}");
        assert!(!debug.contains("-pw"), "{debug}");
        assert_eq!(
            Endpoint::new("redis://app:pw@cache:6379/2").shown(),
            "redis://app:***@cache:6379/2"
        );
    }

    #[test]
    fn passwords_never_reach_errors() {
        assert_eq!(
            redact_password("redis://app:s3cr3t@cache:6379/2"),
            "redis://app:***@cache:6379/2"
        );
        assert_eq!(
            redact_password("redis://:s3cr3t@cache"),
            "redis://:***@cache"
        );
        assert_eq!(
            redact_password("redis://cache:6379/0"),
            "redis://cache:6379/0"
        );
        assert_eq!(redact_password("redis://user@cache"), "redis://user@cache");
    }
}
