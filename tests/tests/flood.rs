//! Floods and oversized messages against a coordinator run with `--tls` and a low
//! `--rate-limit`, as real processes on loopback: the flooding key gets clear refusals while
//! another key and the agent's heartbeats go on.

use std::{path::Path, time::Duration};

use futures_util::{StreamExt, stream};
use kowalski_exo_common::proto::{
    ClusterExecuteRequest, ExecStatus, ExecuteRequest, ListNodesRequest, cluster_event::Event,
};
use kowalski_exo_tests::{
    CEILING, Daemon,
    tls_cluster::{KeyedClient, api_key, joined_agent, keyed_client, tls_coordinator_with, token},
};
use tonic::Code;

const RATE: u32 = 50;
const FLOOD: usize = 10_000;

/// A TLS coordinator whose keys may make `RATE` requests per second, with one joined agent.
async fn cluster(dir: &Path) -> (Daemon, Daemon) {
    let data = dir.join("coordinator");
    let coordinator = tls_coordinator_with(&data, &["--rate-limit", &RATE.to_string()]);
    let agent = joined_agent(
        &coordinator,
        "worker",
        &dir.join("node"),
        Some(&token(&data)),
    );
    let mut client = keyed_client(&coordinator.url(), &data, &api_key(&data, "setup")).await;
    let start = std::time::Instant::now();
    while node_state(&mut client).await.as_deref() != Some("ready") {
        assert!(start.elapsed() < CEILING, "the agent never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (coordinator, agent)
}

async fn node_state(client: &mut KeyedClient) -> Option<String> {
    let nodes = client
        .list_nodes(ListNodesRequest {})
        .await
        .ok()?
        .into_inner()
        .nodes;
    nodes.first().map(|n| n.state.clone())
}

async fn print_seven(client: &mut KeyedClient) -> String {
    let request = ClusterExecuteRequest {
        execution: Some(ExecuteRequest {
            language: "python".into(),
            code: "print(7)".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let mut output = Vec::new();
    while let Some(event) = tokio::time::timeout(CEILING, stream.message())
        .await
        .expect("run hung")
        .unwrap()
    {
        match event.event {
            Some(Event::Output(out)) => output.extend(out.chunk.unwrap_or_default().data),
            Some(Event::Finished(f)) => assert_eq!(
                f.result.map(|r| r.status()),
                Some(ExecStatus::Ok),
                "{}",
                f.error
            ),
            _ => {}
        }
    }
    String::from_utf8_lossy(&output).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_flood_is_refused_while_another_key_and_the_heartbeats_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = cluster(dir.path()).await;
    let data = dir.path().join("coordinator");
    let flooder = keyed_client(&coordinator.url(), &data, &api_key(&data, "flood")).await;
    let mut normal = keyed_client(&coordinator.url(), &data, &api_key(&data, "normal")).await;

    let flood = tokio::spawn(async move {
        stream::iter(0..FLOOD)
            .map(|_| {
                let mut client = flooder.clone();
                async move { client.list_nodes(ListNodesRequest {}).await.err() }
            })
            .buffer_unordered(64)
            .filter_map(|refused| async move { refused })
            .collect::<Vec<_>>()
            .await
    });
    // Meanwhile the other key runs code, and the node never looks silent.
    let mut runs = 0;
    while !flood.is_finished() || runs < 3 {
        assert_eq!(print_seven(&mut normal).await, "7\n");
        assert_eq!(node_state(&mut normal).await.as_deref(), Some("ready"));
        runs += 1;
    }
    let refused = flood.await.unwrap();
    assert!(
        refused.len() > FLOOD / 2,
        "only {} of {FLOOD} refused",
        refused.len()
    );
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    assert!(
        refused[0].message().contains(&format!(
            "'flood' made more than {RATE} requests per second"
        )),
        "{}",
        refused[0].message()
    );
    let nodes = normal
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert!(nodes[0].last_seen_ms_ago < 1500, "{nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = cluster(dir.path()).await;
    let data = dir.path().join("coordinator");
    let mut client = keyed_client(&coordinator.url(), &data, &api_key(&data, "big")).await;
    let request = |code: String, stdin: Vec<u8>| ClusterExecuteRequest {
        execution: Some(ExecuteRequest {
            language: "python".into(),
            code,
            stdin,
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = client
        .execute(request("#".repeat(10 << 20), Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("at most 1048576 bytes"),
        "{}",
        err.message()
    );
    // Past the largest message any request may be, the server stops reading it.
    let err = client
        .execute(request("print(1)".into(), vec![b'x'; 32 << 20]))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(err.message().contains("too large"), "{}", err.message());
    assert_eq!(print_seven(&mut client).await, "7\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_flood_gets_429_while_another_key_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = cluster(dir.path()).await;
    let data = dir.path().join("coordinator");
    let http = coordinator.logged_addr("http api listening");
    let ca = data.join("authority.pem");
    let url = format!("https://localhost:{}/v1/models", http.port());
    let flood_key = api_key(&data, "flood");
    let normal_key = api_key(&data, "normal");
    // curl makes the 10,000 requests itself, 50 at a time over HTTP/2.
    let config = dir.path().join("flood.curl");
    let mut lines = String::new();
    for _ in 0..FLOOD {
        lines.push_str(&format!("url = \"{url}\"\noutput = \"/dev/null\"\n"));
    }
    std::fs::write(&config, lines).unwrap();
    let flood = std::process::Command::new("curl")
        .args(["--silent", "--parallel", "--parallel-max", "50", "--cacert"])
        .arg(&ca)
        .args(["-H", &format!("Authorization: Bearer {flood_key}")])
        .args(["-w", "%{http_code}\n", "-K"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    let get = |key: &str| {
        let output = std::process::Command::new("curl")
            .args(["--silent", "--cacert"])
            .arg(&ca)
            .args(["-H", &format!("Authorization: Bearer {key}")])
            .args(["-o", "/dev/null", "-w", "%{http_code}", &url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    for _ in 0..5 {
        assert_eq!(get(&normal_key), "200");
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = flood.wait_with_output().unwrap();
    let codes = String::from_utf8_lossy(&output.stdout);
    let too_many = codes.lines().filter(|c| *c == "429").count();
    let served = codes.lines().filter(|c| *c == "200").count();
    assert_eq!(too_many + served, FLOOD, "other answers: {codes:.300}");
    assert!(too_many > FLOOD / 2, "only {too_many} of {FLOOD} refused");
    assert_eq!(get(&normal_key), "200");
}
