//! A coordinator run with `--tls` on loopback and what its owner does with its data directory:
//! print the join token, create API keys, and call it as a keyed client.

use std::path::Path;

use kowalski_exo_common::{
    proto::coordinator_client::CoordinatorClient,
    security::Identity,
    transport::{self, ClientTls},
};
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::{Daemon, binary, outcome};

/// A coordinator with TLS on loopback (and its HTTP API), keeping its authority in `data`.
pub fn tls_coordinator(data: &Path) -> Daemon {
    tls_coordinator_with(data, &[])
}

/// [`tls_coordinator`] with `extra` arguments to `serve`.
pub fn tls_coordinator_with(data: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--tls",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Daemon::start("coordinator", &args, &[], "coordinator listening")
}

/// `coordinator ARGS... --data-dir DATA`: exit code, stdout, stderr.
pub fn admin(data: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    outcome(
        std::process::Command::new(binary("coordinator"))
            .args(args)
            .args(["--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap(),
    )
}

/// `coordinator token` for the data directory.
pub fn token(data: &Path) -> String {
    let (code, out, err) = admin(data, &["token"]);
    assert_eq!(code, Some(0), "{err}");
    out.trim().to_string()
}

/// A fresh API key called `name`.
pub fn api_key(data: &Path, name: &str) -> String {
    let (code, out, err) = admin(data, &["apikey", "create", name]);
    assert_eq!(code, Some(0), "{err}");
    out.trim().to_string()
}

/// A node agent on loopback that has joined with `join`, or holds its certificate in `data`.
pub fn joined_agent(coordinator: &Daemon, name: &str, data: &Path, join: Option<&str>) -> Daemon {
    let url = coordinator.url();
    let mut args = vec![
        "--coordinator",
        &url,
        "--name",
        name,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    if let Some(token) = join {
        args.extend(["--join", token]);
    }
    Daemon::start("node-agent", &args, &[], "node agent listening")
}

/// TLS as a client trusting the cluster authority kept in `data`.
pub fn client_tls(data: &Path, identity: Option<Identity>) -> ClientTls {
    ClientTls {
        authority_pem: std::fs::read_to_string(data.join("authority.pem")).unwrap(),
        identity,
        server_name: None,
    }
}

pub async fn tls_channel(url: &str, tls: ClientTls) -> Result<Channel, tonic::transport::Error> {
    transport::endpoint(url, Some(&tls))?.connect().await
}

/// Adds `authorization: Bearer KEY` to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type KeyedClient = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// A Coordinator client over TLS (trusting the authority in `data`) that sends `key`.
pub async fn keyed_client(url: &str, data: &Path, key: &str) -> KeyedClient {
    let channel = tls_channel(url, client_tls(data, None)).await.unwrap();
    let bearer = Bearer(format!("Bearer {key}").parse().unwrap());
    CoordinatorClient::with_interceptor(channel, bearer)
}
