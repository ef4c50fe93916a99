//! The tonic service: decode, run the snapshotter off the async runtime, encode. One
//! tracing span per call with the method and key; errors go through [`Error`]'s one status map.
//! The wire Info and Kind are converted to and from the snapshotter's own here, and only here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::api::snapshots as pb;
use crate::api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use crate::error::Error;
use crate::info::{Info, Kind};
use crate::snapshotter::Snapshotter;

/// List answers in batches of at most this many snapshots...
const LIST_BATCH: usize = 100;
/// ...and about this many encoded bytes, well under the 4 MiB a gRPC client takes by
/// default (keys and labels can be long: 100 snapshots with 64 KiB keys would not fit).
const LIST_BATCH_BYTES: usize = 1 << 20;

impl From<Kind> for pb::Kind {
    fn from(kind: Kind) -> pb::Kind {
        match kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        }
    }
}

/// The kind a request carries, read as containerd reads it (`KindFromProto`, `toKind` before
/// 2.0): ACTIVE and VIEW are themselves, anything else (COMMITTED, UNKNOWN, a number that is
/// no kind) is Committed. Only Update carries one, and ignores it: containerd's own Update
/// sends the zero kind, which its proxy turns into COMMITTED whatever the snapshot is, and its
/// snapshots service accepts any kind there. So no kind is an error on the way in.
fn kind_from_pb(kind: i32) -> Kind {
    match pb::Kind::try_from(kind) {
        Ok(pb::Kind::Active) => Kind::Active,
        Ok(pb::Kind::View) => Kind::View,
        Ok(pb::Kind::Committed | pb::Kind::Unknown) | Err(_) => Kind::Committed,
    }
}

impl From<Info> for pb::Info {
    fn from(info: Info) -> pb::Info {
        pb::Info {
            name: info.name,
            parent: info.parent,
            kind: pb::Kind::from(info.kind) as i32,
            created_at: info.created.map(prost_types::Timestamp::from),
            updated_at: info.updated.map(prost_types::Timestamp::from),
            labels: info.labels,
        }
    }
}

/// The Info of an Update request. Update reads its name and labels only; a time out of
/// `SystemTime`'s range reads as none.
impl From<pb::Info> for Info {
    fn from(info: pb::Info) -> Info {
        let time =
            |ts: Option<prost_types::Timestamp>| ts.and_then(|t| SystemTime::try_from(t).ok());
        Info {
            kind: kind_from_pb(info.kind),
            created: time(info.created_at),
            updated: time(info.updated_at),
            name: info.name,
            parent: info.parent,
            labels: info.labels,
        }
    }
}

/// Split `infos` into List responses by [`LIST_BATCH`] and [`LIST_BATCH_BYTES`]; a single
/// snapshot larger than the byte bound goes alone.
fn batch(infos: Vec<pb::Info>) -> Vec<pb::ListSnapshotsResponse> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for info in infos {
        let len = prost::Message::encoded_len(&info) + 8;
        if !cur.is_empty() && (cur.len() == LIST_BATCH || bytes + len > LIST_BATCH_BYTES) {
            out.push(pb::ListSnapshotsResponse {
                info: std::mem::take(&mut cur),
            });
            bytes = 0;
        }
        bytes += len;
        cur.push(info);
    }
    if !cur.is_empty() {
        out.push(pb::ListSnapshotsResponse { info: cur });
    }
    out
}

/// Where a call's work runs (see [`Service::call`]).
#[derive(Clone, Copy)]
enum Run {
    /// On the async runtime's thread: a read of the metadata store, no directory walk.
    Inline,
    /// On the blocking pool: store writes (fsync), directory creation, removal and walks.
    Blocking,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Snapshotter>,
}

impl Service {
    pub fn new(inner: Arc<Snapshotter>) -> Self {
        Service { inner }
    }

    pub fn into_server(self) -> SnapshotsServer<Service> {
        SnapshotsServer::new(self)
    }

    /// Run `f` inside a span for `method` and `key`: on the blocking pool when it may touch
    /// the disk for long ([`Run::Blocking`]: writes, walks), or right on the runtime thread when
    /// it is a short metadata read ([`Run::Inline`]), which saves two thread hand-offs per call.
    async fn call<T, F>(
        &self,
        method: &'static str,
        key: &str,
        ns: Option<String>,
        run: Run,
        f: F,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    {
        let span = tracing::info_span!("grpc", method, key, ns = ns.as_deref().unwrap_or(""));
        let inner = self.inner.clone();
        let blocking_span = span.clone();
        async move {
            let res = match run {
                Run::Inline => f(&inner),
                Run::Blocking => tokio::task::spawn_blocking(move || {
                    let _e = blocking_span.enter();
                    f(&inner)
                })
                .await
                .map_err(|e| Status::internal(format!("{method}: worker failed: {e}")))?,
            };
            match res {
                Ok(v) => {
                    tracing::debug!("ok");
                    Ok(v)
                }
                Err(e) => {
                    if e.is_caller_error() {
                        tracing::debug!(error = %e, "rejected");
                    } else {
                        tracing::error!(error = %e, "failed");
                    }
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }
}

fn namespace<T>(r: &Request<T>) -> Option<String> {
    r.metadata()
        .get("containerd-namespace")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .call("Prepare", &key, ns, Run::Blocking, move |s| {
                s.prepare(&r.key, &r.parent, r.labels)
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .call("View", &key, ns, Run::Blocking, move |s| {
                s.view(&r.key, &r.parent, r.labels)
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .call("Mounts", &key, ns, Run::Inline, move |s| s.mounts(&r.key))
            .await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let key = r.key.clone();
        self.call("Commit", &key, ns, Run::Blocking, move |s| {
            s.commit(&r.name, &r.key, r.labels)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let key = r.key.clone();
        self.call("Remove", &key, ns, Run::Blocking, move |s| s.remove(&r.key))
            .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let key = r.key.clone();
        let info = self
            .call("Stat", &key, ns, Run::Inline, move |s| s.stat(&r.key))
            .await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info.into()),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let Some(info) = r.info else {
            return Err(Error::InvalidArgument("update: info is required".into()).into());
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = Info::from(info);
        let key = info.name.clone();
        let info = self
            .call("Update", &key, ns, Run::Blocking, move |s| {
                s.update(&info, &paths)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info.into()),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let infos = self
            .call("List", "", ns, Run::Blocking, move |s| s.list(&r.filters))
            .await?;
        let infos = infos.into_iter().map(pb::Info::from).collect();
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> =
            batch(infos).into_iter().map(Ok).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let ns = namespace(&request);
        let r = request.into_inner();
        let key = r.key.clone();
        let u = self
            .call("Usage", &key, ns, Run::Blocking, move |s| s.usage(&r.key))
            .await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request);
        self.call("Cleanup", "", ns, Run::Blocking, |s| {
            s.cleanup().map(|_| ())
        })
        .await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: String) -> pb::Info {
        pb::Info {
            name,
            ..Default::default()
        }
    }

    #[test]
    fn kinds_convert_both_ways() {
        for kind in [Kind::View, Kind::Active, Kind::Committed] {
            assert_eq!(kind_from_pb(pb::Kind::from(kind) as i32), kind);
        }
        // As containerd reads a request's kind: what is not ACTIVE or VIEW is Committed.
        assert_eq!(kind_from_pb(pb::Kind::Unknown as i32), Kind::Committed);
        assert_eq!(kind_from_pb(42), Kind::Committed);
        assert_eq!(kind_from_pb(-1), Kind::Committed);
    }

    #[test]
    fn info_converts_both_ways() {
        let ts = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_456_789,
        };
        let wire = pb::Info {
            name: "ns/1/a b".into(),
            parent: "p".into(),
            kind: pb::Kind::View as i32,
            created_at: Some(ts),
            updated_at: None,
            labels: [("k".to_string(), "v".to_string())].into(),
        };
        let own = Info::from(wire.clone());
        assert_eq!(own.kind, Kind::View);
        assert_eq!(own.updated, None);
        assert_eq!(pb::Info::from(own), wire);
    }

    #[test]
    fn batches_by_count_and_bytes() {
        let sizes =
            |b: &[pb::ListSnapshotsResponse]| b.iter().map(|r| r.info.len()).collect::<Vec<_>>();
        let small: Vec<_> = (0..250).map(|i| info(format!("s{i}"))).collect();
        assert_eq!(sizes(&batch(small)), [100, 100, 50]);
        let big: Vec<_> = (0..10)
            .map(|i| info(format!("{i}{}", "k".repeat(300 << 10))))
            .collect();
        let b = batch(big);
        assert_eq!(sizes(&b), [3, 3, 3, 1]);
        assert!(
            b.iter()
                .all(|r| prost::Message::encoded_len(r) <= LIST_BATCH_BYTES + 64)
        );
        let huge = vec![info("h".repeat(2 << 20)), info("x".into())];
        assert_eq!(sizes(&batch(huge)), [1, 1]);
        assert!(batch(Vec::new()).is_empty());
    }
}
