//! A blocking client of containerd's snapshots service (on containerd's own socket), in
//! namespace `bench`, for any snapshotter containerd knows.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rustfuse_snapshotter::api::Mount;
use rustfuse_snapshotter::api::snapshots::{self as pb, snapshots_client::SnapshotsClient};
use tonic::transport::{Channel, Endpoint};

pub const NAMESPACE: &str = "bench";
const GC_ROOT: &str = "containerd.io/gc.root";

pub struct Client {
    rt: tokio::runtime::Runtime,
    c: SnapshotsClient<Channel>,
}

fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(NAMESPACE),
    );
    r
}

/// Labels that keep a snapshot from containerd's garbage collector.
fn gc_root() -> HashMap<String, String> {
    HashMap::from([(GC_ROOT.to_string(), "bench".to_string())])
}

impl Client {
    pub fn connect(socket: &Path) -> anyhow::Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let socket = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:50051")?
                    .timeout(Duration::from_secs(120))
                    .connect_timeout(Duration::from_secs(10))
                    .connect_with_connector(tower::service_fn(move |_| {
                        let socket = socket.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
            })
            .context("connect to containerd's socket")?;
        Ok(Client {
            rt,
            c: SnapshotsClient::new(channel),
        })
    }

    pub fn prepare(&self, sn: &str, key: &str, parent: &str) -> anyhow::Result<Vec<Mount>> {
        let mut c = self.c.clone();
        let r = pb::PrepareSnapshotRequest {
            snapshotter: sn.into(),
            key: key.into(),
            parent: parent.into(),
            labels: gc_root(),
        };
        let r = self
            .rt
            .block_on(c.prepare(req(r)))
            .with_context(|| format!("{sn}: prepare {key} (parent {parent:?})"))?;
        Ok(r.into_inner().mounts)
    }

    pub fn view(&self, sn: &str, key: &str, parent: &str) -> anyhow::Result<Vec<Mount>> {
        let mut c = self.c.clone();
        let r = pb::ViewSnapshotRequest {
            snapshotter: sn.into(),
            key: key.into(),
            parent: parent.into(),
            labels: gc_root(),
        };
        let r = self
            .rt
            .block_on(c.view(req(r)))
            .with_context(|| format!("{sn}: view {key} (parent {parent:?})"))?;
        Ok(r.into_inner().mounts)
    }

    pub fn mounts(&self, sn: &str, key: &str) -> anyhow::Result<Vec<Mount>> {
        let mut c = self.c.clone();
        let r = pb::MountsRequest {
            snapshotter: sn.into(),
            key: key.into(),
        };
        let r = self
            .rt
            .block_on(c.mounts(req(r)))
            .with_context(|| format!("{sn}: mounts {key}"))?;
        Ok(r.into_inner().mounts)
    }

    pub fn commit(&self, sn: &str, name: &str, key: &str) -> anyhow::Result<()> {
        let mut c = self.c.clone();
        let r = pb::CommitSnapshotRequest {
            snapshotter: sn.into(),
            name: name.into(),
            key: key.into(),
            labels: gc_root(),
            parent: String::new(),
        };
        self.rt
            .block_on(c.commit(req(r)))
            .with_context(|| format!("{sn}: commit {key} as {name}"))?;
        Ok(())
    }

    pub fn remove(&self, sn: &str, key: &str) -> anyhow::Result<()> {
        let mut c = self.c.clone();
        let r = pb::RemoveSnapshotRequest {
            snapshotter: sn.into(),
            key: key.into(),
        };
        self.rt
            .block_on(c.remove(req(r)))
            .with_context(|| format!("{sn}: remove {key}"))?;
        Ok(())
    }

    pub fn list(&self, sn: &str) -> anyhow::Result<Vec<pb::Info>> {
        let mut c = self.c.clone();
        let r = pb::ListSnapshotsRequest {
            snapshotter: sn.into(),
            filters: Vec::new(),
        };
        self.rt
            .block_on(async move {
                let mut stream = c.list(req(r)).await?.into_inner();
                let mut out = Vec::new();
                while let Some(msg) = stream.message().await? {
                    out.extend(msg.info);
                }
                Ok::<_, tonic::Status>(out)
            })
            .with_context(|| format!("{sn}: list"))
    }

    /// Remove every snapshot of `sn` in our namespace, children before parents.
    pub fn remove_all(&self, sn: &str) -> anyhow::Result<usize> {
        let mut left = self.list(sn)?;
        let total = left.len();
        while !left.is_empty() {
            let parents: HashSet<String> = left.iter().map(|i| i.parent.clone()).collect();
            let (leaves, rest): (Vec<_>, Vec<_>) =
                left.into_iter().partition(|i| !parents.contains(&i.name));
            anyhow::ensure!(!leaves.is_empty(), "{sn}: snapshot parents form a cycle");
            for l in &leaves {
                // The garbage collector may have taken it since the List.
                let r = self.remove(sn, &l.name);
                if let Err(e) = r
                    && e.downcast_ref::<tonic::Status>()
                        .is_none_or(|s| s.code() != tonic::Code::NotFound)
                {
                    return Err(e);
                }
            }
            left = rest;
        }
        Ok(total)
    }
}
