//! The bus as an attacker finds it: anonymous connections are refused, a
//! host's own credentials (what a compromised host holds) reach only that
//! host's subjects, an alerting subscriber reads and nothing else, `revoke`
//! cuts a host off the bus and the data plane, `doctor` undoes what an
//! administrator's mistake (or the coordinator's stolen credentials) did to
//! the streams, and hosts on networks of their own work together over it.

use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use flotilla_protocol::permissions::{inbox_prefix, Role as PermRole};
use flotilla_protocol::{subject, HostName, TaskKind};
use flotilla_tests::netns::{self, Netns};
use flotilla_tests::{publish_task, Fleet, NatsServer, EVENT_TIMEOUT, STARTUP_TIMEOUT};
use futures::StreamExt;
use serde_json::Value;

use super::dataplane::{backup_ok, start_world};
use super::{is_task_event, path_str};

/// How long an attacker's JetStream request waits for the answer that a
/// permission violation never sends.
const DENIED_WAIT: Duration = Duration::from_secs(2);

/// A JetStream context on `client` that gives up after [`DENIED_WAIT`].
fn attacker_js(client: &async_nats::Client) -> jetstream::Context {
    let mut js = jetstream::new(client.clone());
    js.set_timeout(DENIED_WAIT);
    js
}

/// Fails the test with `what` when `result` is a success.
fn denied<T, E: std::fmt::Debug>(fleet: &Fleet, what: &str, result: Result<T, E>) {
    if result.is_ok() {
        fleet.fail(format!("{what} was allowed"));
    }
}

/// Nothing arrives on `sub` within a second.
async fn hears_nothing(sub: &mut async_nats::Subscriber) -> bool {
    !matches!(
        tokio::time::timeout(Duration::from_secs(1), sub.next()).await,
        Ok(Some(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_a_host_reaches_only_its_own_subjects() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let _agents = start_world(&fleet, &["alpha"]);

    // Anyone on the LAN: no credentials, no connection (TLS is accepted, so
    // the refusal is about authentication).
    match fleet.nats_client_anonymous().await {
        Ok(_) => fleet.fail("an anonymous client was let onto the bus"),
        Err(e) => {
            let why = format!("{e:#}").to_lowercase();
            assert!(
                why.contains("authorization") || why.contains("authentication"),
                "refused for another reason: {why}"
            );
        }
    }

    // alpha's own user, as a compromised alpha holds it.
    let alpha = fleet.nats_client_as_host("alpha").await?;
    let js = attacker_js(&alpha);

    // Eavesdrop on nas's tasks and repository queries: not even subscribed.
    // The coordinator's subscriptions to the same subjects prove that
    // traffic did flow there.
    let mut tasks_of_nas = alpha.subscribe(subject::task(&host("nas"))).await?;
    let mut queries_of_nas = alpha.subscribe("flotilla.repo.nas.>").await?;
    let coordinator = fleet.nats_client().await?;
    let mut control_tasks = coordinator.subscribe(subject::task(&host("nas"))).await?;
    let mut control_queries = coordinator.subscribe("flotilla.repo.nas.>").await?;
    coordinator.flush().await?;

    // Forge nas's events and heartbeat.
    let forged_event = "flotilla.events.job.succeeded.nas";
    let sent = js
        .publish(forged_event, Bytes::from_static(b"forged"))
        .await;
    let acked = match sent {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(
        !acked,
        "the event stream stored an event alpha forged for nas"
    );
    let health = js.get_key_value(subject::HEALTH_BUCKET).await?;
    denied(
        &fleet,
        "alpha writing nas's heartbeat",
        health.put("nas", Bytes::from_static(b"forged")).await,
    );

    // Steal nas's tasks: a consumer under nas's name, or under its own
    // name but filtered to nas's subject, or under any other name.
    let tasks = js.get_stream(subject::TASK_STREAM).await?;
    for (name, filter) in [
        (
            subject::task_consumer(&host("nas")),
            subject::task(&host("nas")),
        ),
        (
            subject::task_consumer(&host("alpha")),
            subject::task(&host("nas")),
        ),
        ("thief".to_owned(), subject::task(&host("alpha"))),
    ] {
        let made = tasks
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: filter.clone(),
                ..Default::default()
            })
            .await;
        denied(
            &fleet,
            &format!("alpha creating consumer {name} on {filter}"),
            made,
        );
    }

    // Administer JetStream: wipe the history, the fleet, or cripple tasks.
    let mut events = js.get_stream(subject::EVENT_STREAM).await?;
    denied(&fleet, "alpha purging the events", events.purge().await);
    denied(
        &fleet,
        "alpha deleting the event stream",
        js.delete_stream(subject::EVENT_STREAM).await,
    );
    denied(
        &fleet,
        "alpha deleting the health bucket",
        js.delete_key_value(subject::HEALTH_BUCKET).await,
    );
    let mut crippled = tasks.cached_info().config.clone();
    crippled.max_message_size = 1;
    denied(
        &fleet,
        "alpha shrinking the task stream",
        js.update_stream(crippled).await,
    );
    denied(
        &fleet,
        "alpha creating a stream",
        js.create_stream(stream::Config {
            name: "EVIL".into(),
            subjects: vec!["evil.>".into()],
            ..Default::default()
        })
        .await,
    );
    let info = events.info().await?;
    assert!(info.state.messages > 0, "the event history is gone");

    // Meanwhile the fleet keeps working: a real backup of alpha into nas
    // and a listing (queries to nas), and a task for nas (refused by nas as
    // malformed, but sent on nas's subject).
    backup_ok(&fleet, &["alpha"]);
    let listed = fleet.snapshots(&[])?;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    publish_task(&coordinator, "nas", &b"not a task"[..]).await?;
    assert!(
        !hears_nothing(&mut control_tasks).await,
        "no task went to nas: the eavesdropping check below proves nothing"
    );
    assert!(
        !hears_nothing(&mut control_queries).await,
        "no query went to nas: the eavesdropping check below proves nothing"
    );
    assert!(
        hears_nothing(&mut tasks_of_nas).await,
        "alpha read nas's tasks"
    );
    assert!(
        hears_nothing(&mut queries_of_nas).await,
        "alpha heard nas's repository queries"
    );
    // Nothing changed that `doctor` would need to repair.
    let check = fleet.cli(["doctor", "--check"])?;
    assert_eq!(check.code, Some(0), "{check}");
    // And nas's record is still nas's own heartbeat.
    let nas = fleet.host("nas")?.expect("nas is listed");
    assert_eq!(nas["status"], "online", "{nas}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alerting_subscriber_reads_events_and_health_and_nothing_else() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let _alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);

    let creds = fleet.dir().join("watcher.creds");
    let out = fleet.cli([
        "enroll",
        "watcher",
        "--alerting",
        "--out",
        &path_str(&creds),
    ])?;
    assert_eq!(out.code, Some(0), "{out}");
    let text = std::fs::read_to_string(&creds)?;
    assert!(
        text.contains("-----BEGIN NATS USER JWT-----")
            && text.contains("-----BEGIN USER NKEY SEED-----"),
        "not a standard .creds file:\n{text}"
    );
    let watcher = flotilla_tests::connect_as(
        fleet.nats_url(),
        &creds,
        &fleet.ca_path(),
        &inbox_prefix(&PermRole::Alerting(host("watcher"))),
    )
    .await?;
    let js = attacker_js(&watcher);

    // It replays the event history...
    let events = js.get_stream(subject::EVENT_STREAM).await?;
    let replay = events
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "flotilla.events.agent.online.>".into(),
            ..Default::default()
        })
        .await?;
    let mut messages = replay.messages().await?;
    let first = tokio::time::timeout(EVENT_TIMEOUT, messages.next())
        .await?
        .expect("a replayed event")?;
    assert_eq!(first.subject.as_str(), "flotilla.events.agent.online.alpha");
    // ...and reads every host's health.
    let health = js.get_key_value(subject::HEALTH_BUCKET).await?;
    assert!(health.get("alpha").await?.is_some(), "alpha's heartbeat");

    // It cannot speak for anyone or touch anything.
    let mut live = fleet
        .nats_client()
        .await?
        .subscribe("flotilla.events.>")
        .await?;
    watcher
        .publish(
            "flotilla.events.agent.online.alpha",
            Bytes::from_static(b"forged"),
        )
        .await?;
    watcher.flush().await?;
    // Genuine events may pass by; only the forged one must not.
    let forged_arrived = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(msg) = live.next().await {
            if msg.payload.as_ref() == b"forged" {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(!forged_arrived, "the watcher published an event");
    denied(
        &fleet,
        "the watcher writing a heartbeat",
        health.put("alpha", Bytes::from_static(b"forged")).await,
    );
    denied(
        &fleet,
        "the watcher reading the task stream",
        js.get_stream(subject::TASK_STREAM).await,
    );
    denied(
        &fleet,
        "the watcher deleting the event stream",
        js.delete_stream(subject::EVENT_STREAM).await,
    );
    let sent = js
        .publish(subject::task(&host("alpha")), Bytes::from_static(b"forged"))
        .await;
    let queued = match sent {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!queued, "the watcher queued a task");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_cuts_a_host_off_the_bus_and_the_data_plane() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let _agents = start_world(&fleet, &["alpha"]);
    backup_ok(&fleet, &["alpha"]);
    let nas_addr = fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    // Before: nas's own credentials connect.
    drop(fleet.nats_client_as_host("nas").await?);

    let out = fleet.cli(["revoke", "nas", "--json"])?;
    assert_eq!(out.code, Some(0), "{out}");

    // The server refuses its user at once, and says so in `hosts`.
    match fleet.nats_client_as_host("nas").await {
        Ok(_) => fleet.fail("a revoked host's credentials still connect"),
        Err(e) => assert!(
            format!("{e:#}").to_lowercase().contains("authorization"),
            "{e:#}"
        ),
    }
    let nas = fleet.host("nas")?.expect("nas stays listed");
    assert_eq!(nas["status"], "revoked", "{nas}");

    // The running nas agent still listens on QUIC with its certificate:
    // alpha must refuse it, once its revocation list has arrived.
    let client = fleet.nats_client().await?;
    let last: Value = fleet.wait_for(
        "alpha to refuse the revoked nas on the data plane",
        Duration::from_secs(60),
        || {
            let body = fleet.task(
                "alpha",
                TaskKind::Backup {
                    paths: Vec::new(),
                    excludes: Vec::new(),
                    storage: host("nas"),
                    storage_addr: nas_addr,
                    allow_empty: false,
                },
            )?;
            let signed = fleet.sign(&body)?;
            let client = client.clone();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(async move { publish_task(&client, "alpha", signed).await })
            })?;
            let finished =
                fleet.wait_for_event("alpha's task.finished", Duration::from_secs(60), |ev| {
                    is_task_event(ev, "task.finished", body.id.as_str())
                });
            let error = finished["detail"]["error"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase();
            if finished["detail"]["outcome"] == "failed" && error.contains("revoked") {
                Ok(Some(finished))
            } else {
                anyhow::bail!("not refused yet: {finished:#}")
            }
        },
    );
    assert_eq!(last["host"], "alpha", "{last:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_repairs_a_crippled_task_stream_and_removes_a_thief() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let _agents = start_world(&fleet, &["alpha"]);

    // With the coordinator's rights (a mistake, or stolen credentials):
    // every task refused, a consumer waiting for the tasks of a host not
    // started yet (on a work-queue stream it would take them, and keep
    // beta's own agent from ever making its consumer), the fleet bucket
    // gone.
    let js = jetstream::new(fleet.nats_client().await?);
    let tasks = js.get_stream(subject::TASK_STREAM).await?;
    let mut crippled = tasks.cached_info().config.clone();
    crippled.max_message_size = 1;
    js.update_stream(crippled).await?;
    tasks
        .create_consumer(consumer::pull::Config {
            durable_name: Some("thief".into()),
            filter_subject: subject::task(&host("beta")),
            ..Default::default()
        })
        .await?;
    js.delete_key_value(subject::FLEET_BUCKET).await?;
    // A push consumer that would republish every heartbeat onto nas's
    // event subjects (nats-server does not check that its creator may
    // publish there; it refuses only a cycle into the same stream).
    js.get_stream(subject::kv_stream(subject::HEALTH_BUCKET))
        .await?
        .create_consumer(consumer::push::Config {
            durable_name: Some("echo".into()),
            deliver_subject: "flotilla.events.job.succeeded.nas".into(),
            ..Default::default()
        })
        .await?;
    let refused = fleet.backup("alpha", "nas", &[])?;
    assert_ne!(refused.code, Some(0), "a task got through: {refused}");

    let check = fleet.cli(["doctor", "--check", "--json"])?;
    assert_eq!(check.code, Some(2), "{check}");
    let found = fleet.cli(["doctor", "--json"])?;
    assert_eq!(found.code, Some(0), "{found}");
    let report: Value = serde_json::from_str(found.stdout.trim())?;
    let problems: Vec<String> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| format!("{} {}", f["resource"], f["problem"]))
        .collect();
    for needle in [
        "max_msg_size 1",
        "thief",
        subject::FLEET_BUCKET,
        "outside every reply inbox",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "{needle} not found: {problems:#?}"
        );
    }
    let check = fleet.cli(["doctor", "--check"])?;
    assert_eq!(check.code, Some(0), "{check}");
    // Tasks flow again.
    backup_ok(&fleet, &["alpha"]);
    Ok(())
}

#[test]
fn hosts_on_networks_of_their_own_back_up_and_restore_over_the_authenticated_bus() -> Result<()> {
    if let Some(why) = netns::unavailable() {
        eprintln!("skipped: hosts in network namespaces {why}");
        return Ok(());
    }
    // nas, alpha and beta each on a network of its own, joined to the root
    // namespace by a link; the root namespace routes between them and runs
    // the bus on every interface.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    let nats = NatsServer::start_on("0.0.0.0")?;
    let nets = [Netns::create()?, Netns::create()?, Netns::create()?];
    let names: Vec<String> = nets.iter().map(Netns::root_ip).collect();
    let fleet = Fleet::init_with_names(&nats, &names)?;
    let url = |n: &Netns| format!("tls://{}:{}", n.root_ip(), nats.port());
    let port = std::net::UdpSocket::bind("0.0.0.0:0")?.local_addr()?.port();

    // nas listens on every interface and is told nothing about its address.
    let _nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .netns(nets[0].name())
        .nats(&url(&nets[0]))
        .listen_on(&format!("0.0.0.0:{port}"))
        .start()?;
    let alpha = fleet
        .agent("alpha")
        .netns(nets[1].name())
        .nats(&url(&nets[1]))
        .start()?;
    let beta = fleet
        .agent("beta")
        .without_backup_root()
        .restore_root()
        .netns(nets[2].name())
        .nats(&url(&nets[2]))
        .start()?;
    fleet.wait_online(&["nas", "alpha", "beta"], STARTUP_TIMEOUT);
    // It advertises the address of the interface it reaches the bus through.
    let advertised = fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    assert_eq!(
        advertised,
        std::net::SocketAddr::new(nets[0].ns_ip().parse()?, port),
        "nas advertised another address"
    );

    let big = alpha.backup_root().join("big.bin");
    flotilla_tests::write_file(&big, 3 * 1024 * 1024)?;
    let snapshot = super::dataplane::snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let target = beta.restore_root().join("from-alpha");
    let out = fleet.restore(&snapshot, &format!("beta:{}", path_str(&target)), &[])?;
    assert_eq!(out.code, Some(0), "{out}");
    let restored = flotilla_tests::restored_path(&target, &big);
    assert!(
        flotilla_tests::same_contents(&big, &restored)?,
        "{} differs from {}",
        restored.display(),
        big.display()
    );
    Ok(())
}

fn host(name: &str) -> HostName {
    HostName::new(name).expect("a valid host name")
}
