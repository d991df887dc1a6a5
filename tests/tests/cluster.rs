//! Redis Cluster: not served yet, so refused at start with an error that
//! says so, rather than writes failing later with MOVED and CROSSSLOT.

use integration_tests::cluster::RedisCluster;
use integration_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_is_refused_at_start_with_an_error_that_says_so() -> anyhow::Result<()> {
    let cluster = RedisCluster::start().await?;
    let node = cluster.urls()[0].clone();
    let plugins = plugin_dir(&["echo"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config_without_redis(plugins.path(), workspace.path());
    config.redis.url = Some(node.clone());
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        gatewayd::run(config, std::future::pending()),
    )
    .await
    .expect("the daemon gives up at once, it does not retry a cluster");
    let error = outcome.expect_err("a cluster node is refused").to_string();
    eprintln!("the daemon: {error}");
    assert!(error.contains("cluster mode"), "{error}");
    assert!(error.contains("redis.sentinel_master"), "{error}");

    // The client library (the bridge and the CLI use it) says the same.
    let error = match byclaw_client::Client::connect(node.as_str()).await {
        Ok(_) => panic!("the client library connected to a cluster node"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("cluster mode"), "{error}");

    // The same node answers as a plain Redis would: the refusal is the
    // check, not a connection that could not be made.
    let mut conn = redis::Client::open(node.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
    assert_eq!(pong, "PONG");
    Ok(())
}
