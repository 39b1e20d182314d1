//! Mirrored copies of requests (a 0.2 plugin's `forward.mirror`), after
//! NGINX's `mirror` and Envoy's request mirroring: the copy is sent once the
//! real request has its response head, on its own task, and its response is
//! read and discarded. A copy never delays or fails the real request: it is
//! sent only with a free slot (`mirror_max_in_flight`) and a request body
//! the client completed and the proxy kept whole (`retry_buffer_bytes`),
//! to a backend in rotation; every other mirror is skipped and counted. A
//! copy that cannot connect counts as a connect failure of its backend
//! (`max_fails` / `fail_timeout_ms`, as NGINX counts a failed `mirror`
//! subrequest against its server), so a down mirror backend leaves rotation
//! and is not dialled again until its `fail_timeout_ms` has passed.

use std::sync::Arc;

use http::Request;
use http_body_util::BodyExt as _;

use super::Downstream;
use super::pool::{ConnPool, SendError};
use crate::headers::prepare_request;
use crate::retry::{AttemptBody, ReplayBody};
use crate::upstream::{Target, Upstream};

/// Send a copy of `head` (already carrying the plugin's request changes)
/// with a copy of `body` to `target`, the backend of `upstream` the plugin
/// named (`None`: it named none of the set), in the background.
/// Counted in `wasmlb_mirror_requests_total` as `sent` (a response head
/// came within `response_timeout_ms`), `failed` (none did) or `skipped`
/// (no such backend, a backend out of rotation after connect failures or
/// ejected by outlier detection, no free slot, or a body still arriving,
/// failed or larger than the buffer).
pub(super) fn mirror(
    upstream: &Arc<Upstream>,
    pool: &Arc<ConnPool>,
    downstream: &Downstream,
    mut head: http::request::Parts,
    body: &ReplayBody,
    target: Option<Target>,
) {
    let [sent, failed, skipped] = &upstream.metrics().mirrors;
    let Some(target) = target else {
        skipped.inc();
        return;
    };
    let now = std::time::Instant::now();
    if target.live.unreachable(now) || target.live.ejected(now) {
        skipped.inc();
        return;
    }
    let Ok(slot) = upstream.mirror_slots.clone().try_acquire_owned() else {
        skipped.inc();
        return;
    };
    let Some(chunks) = body.complete_copy() else {
        skipped.inc();
        return;
    };
    // The body is complete: nothing to ask the mirror to continue.
    head.headers.remove(http::header::EXPECT);
    let https = downstream.tls.is_some();
    if prepare_request(&mut head, &downstream.client_ip, &target.authority, https).is_err() {
        skipped.inc();
        return;
    }
    let request = Request::from_parts(head, AttemptBody::fixed(chunks));
    let (pool, addresses, timeout) = (
        pool.clone(),
        downstream.addresses(),
        upstream.response_timeout,
    );
    let (sent, failed) = (sent.clone(), failed.clone());
    let upstream = upstream.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let answer = tokio::time::timeout(timeout, pool.send(target.address, &addresses, request));
        let (response, mut lease) = match answer.await {
            Ok(Ok(answered)) => answered,
            Ok(Err(SendError::Connect(_))) => {
                upstream.report_connect_failure(&target);
                failed.inc();
                return;
            }
            Ok(Err(_)) | Err(_) => {
                failed.inc();
                return;
            }
        };
        upstream.report_connected(&target);
        sent.inc();
        // Read and discard the body (no more than the response timeout
        // again), so the connection can be pooled.
        let mut body = response.into_body();
        let drained = tokio::time::timeout(timeout, async {
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    return false;
                }
            }
            true
        });
        if drained.await == Ok(true) {
            lease.finished();
        }
    });
}
