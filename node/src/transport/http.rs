//! The REST routes of DESIGN §3.1 and the choice between the forms of the watch route.
//!
//! `GET /v1/topics/{topic}/events` answers, by request:
//! - `Accept: application/x-ndjson` → NDJSON streaming ([`crate::transport::stream`]);
//! - `watch=true` or `Accept: text/event-stream` → SSE ([`crate::transport::stream`]);
//! - `wait=S` → long-poll ([`crate::transport::poll`]);
//! - otherwise a history page after `since` ([`crate::transport::poll`]).

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use weft_proto::{validate_topic, BatchPublish, MultiCursor};

use crate::auth::edge::{self, admit_subscribe, caller, require, require_admin};
use crate::auth::{Caller, Op};
use crate::error::ApiError;
use crate::input::{check_topic, event_data, event_kind, parse_since, raw_data};
use crate::node::Node;
use crate::session::event::put_u64;
use crate::transport::respond::json_ok;
use crate::transport::stream::{self, Format};
use crate::transport::{contract, poll, ws};

/// The client listener's routes. Probes and metrics are here too unless the node has
/// its own ops listener (`ops.listen`), in which case they are served only there.
pub fn app(node: Arc<Node>) -> Router {
    let with_ops = node.config.ops.listen.is_none();
    let openapi = contract::openapi(&node.config.limits);
    let mut r = Router::new()
        .route("/v1/topics/{topic}/events", post(publish).get(events))
        .route("/v1/topics/{topic}", get(state))
        .route("/v1/topics/{topic}/presence", get(presence))
        .route("/v1/publish", post(batch_publish))
        .route("/v1/publish/stream", post(publish_stream))
        .route("/v1/events", get(multi_events))
        .route("/v1/ws", get(ws::upgrade))
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move { json_ok(doc) }
            }),
        )
        .route(
            "/v1/asyncapi.json",
            get(|| async { json_ok(Bytes::from_static(contract::ASYNCAPI.as_bytes())) }),
        );
    r = admin_routes(r);
    if with_ops {
        r = ops_routes(r);
    }
    finish(r, node)
}

/// The ops listener's routes (`--ops-listen`): probes, metrics, admin.
pub fn ops_app(node: Arc<Node>) -> Router {
    finish(admin_routes(ops_routes(Router::new())), node)
}

fn admin_routes(r: Router<Arc<Node>>) -> Router<Arc<Node>> {
    r.route("/v1/cluster", get(cluster))
        .route("/v1/cluster/owner/{topic}", get(cluster_owner))
        .route("/v1/admin/drain", post(admin_drain))
        .route("/v1/admin/revoke", post(admin_revoke))
}

fn ops_routes(r: Router<Arc<Node>>) -> Router<Arc<Node>> {
    r.route(
        "/healthz",
        get(|| async { json_ok(Bytes::from_static(b"{\"status\":\"ok\"}")) }),
    )
    .route("/readyz", get(readyz))
    .route("/metrics", get(metrics))
}

fn finish(r: Router<Arc<Node>>, node: Arc<Node>) -> Router {
    r.fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            edge::middleware,
        ))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            crate::transport::head::limits,
        ))
        .layer(axum::middleware::map_response_with_state(
            node.clone(),
            count_refusals,
        ))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            crate::stats::track_http,
        ))
        .with_state(node)
}

/// Extractor: the caller the edge middleware resolved (`401` when there is none).
struct Who(Caller);

/// Extractor: a caller who may publish somewhere, on a node that takes publishes now
/// (see [`refuse_while_draining`]); the topic's own check stays with the handler.
struct Publisher(Caller);

/// Extractor: an admin caller, not a web page (see [`require_admin`]).
struct Admin;

/// Extractor: a caller who may see the cluster's layout: admin only, unless
/// `ops.public_cluster_view`.
struct ClusterViewer;

impl FromRequestParts<Arc<Node>> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        caller(node, parts.extensions.get::<Caller>()).map(Self)
    }
}

impl FromRequestParts<Arc<Node>> for Publisher {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let Who(c) = Who::from_request_parts(parts, node).await?;
        refuse_while_draining(node)?;
        Ok(Self(c))
    }
}

impl FromRequestParts<Arc<Node>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let Who(c) = Who::from_request_parts(parts, node).await?;
        require_admin(node, &c, &parts.headers).map(|()| Self)
    }
}

impl FromRequestParts<Arc<Node>> for ClusterViewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        if node.auth.public_cluster_view() {
            return Ok(Self);
        }
        Admin::from_request_parts(parts, node)
            .await
            .map(|Admin| Self)
    }
}

/// A read of `topic` (state, history, long-poll, watches).
fn may_read(node: &Node, c: &Caller, topic: &str) -> Result<(), ApiError> {
    require(node, c, Op::Read(topic), true)?;
    admit_subscribe(node, c)
}

/// A REST publish. The namespace's `client_publish` binds clients (tokens); backends
/// (API keys) and development-mode callers are not clients in that sense.
fn may_publish(node: &Node, c: &Caller, topic: &str) -> Result<(), ApiError> {
    let client_rule = match c {
        Caller::User(_) => node.registry.namespaces.lookup(topic).client_publish,
        _ => true,
    };
    require(node, c, Op::Publish(topic), client_rule)
}

/// A publish body must say it is JSON, so a cross-site HTML form (which can only send
/// `text/plain`, `multipart/form-data` or `application/x-www-form-urlencoded`) can
/// never publish.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(
            "the body must be sent as Content-Type: application/json".into(),
        ))
    }
}

/// Every refused request is counted in one place, whichever handler refused it.
async fn count_refusals(State(node): State<Arc<Node>>, resp: Response) -> Response {
    match resp.status().as_u16() {
        400 | 404 | 405 | 413 | 414 | 415 | 422 | 431 => node.stats.bad_input.inc(),
        429 => node.stats.rate_limited.inc(),
        _ => {}
    }
    resp
}

/// Extractor: the route's `{topic}`, a valid topic name (`400` otherwise).
struct Topic(String);

impl FromRequestParts<Arc<Node>> for Topic {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let Path(topic) = Path::<String>::from_request_parts(parts, node)
            .await
            .map_err(|e| ApiError::bad(format!("bad path: {e}")))?;
        check_topic(&topic)?;
        Ok(Self(topic))
    }
}

/// The query string as decoded pairs (repeated keys kept, as `topic=a&topic=b`).
pub fn query(uri: &Uri) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).collect()
}

fn param<'a>(q: &'a [(Cow<'_, str>, Cow<'_, str>)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_ref())
}

fn parse_bool(v: Option<&str>, key: &str) -> Result<bool, ApiError> {
    match v {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(ApiError::bad(format!(
            "`{key}` must be true or false, not `{other}`"
        ))),
    }
}

fn accepts(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|m| m.trim().starts_with(mime)))
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad("Last-Event-ID is not ASCII")),
    }
}

/// Reads a request body of at most `limit` bytes: `413` past it, checked against
/// `Content-Length` before anything is read.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::TooLarge(format!("body exceeds {limit} bytes"));
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
    {
        match len.parse::<u64>() {
            Ok(n) if n > limit as u64 => return Err(too_large()),
            Ok(_) => {}
            Err(_) => return Err(ApiError::bad("invalid Content-Length")),
        }
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(_) => Err(ApiError::bad("could not read the request body")),
    }
}

fn publish_result_json(topic: &str, epoch: &str, offset: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + topic.len());
    write_publish_result(&mut out, topic, epoch, offset);
    out.freeze()
}

fn write_publish_result(out: &mut BytesMut, topic: &str, epoch: &str, offset: u64) {
    out.extend_from_slice(b"{");
    write_publish_fields(out, topic, epoch, offset);
    out.extend_from_slice(b"}");
}

/// `"topic":"…","epoch":"…","offset":N` (a topic and an epoch are checked names that
/// need no escaping); the streaming publish prefixes its `seq`.
pub fn write_publish_fields(out: &mut BytesMut, topic: &str, epoch: &str, offset: u64) {
    out.extend_from_slice(b"\"topic\":\"");
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(b"\",\"epoch\":\"");
    out.extend_from_slice(epoch.as_bytes());
    out.extend_from_slice(b"\",\"offset\":");
    put_u64(out, offset);
}

/// A draining single node must not acknowledge what its in-memory history is about to
/// lose: publishers get 503 and retry against the node that replaces it.
pub fn refuse_while_draining(node: &Node) -> Result<(), ApiError> {
    // In a cluster a draining node hands its topics over and forwards publishes to
    // their new owners, so it keeps accepting.
    if !node.is_draining() || node.relay.get().is_some() {
        Ok(())
    } else {
        Err(ApiError::Unavailable {
            message: "node is draining; retry on another node".into(),
            retry_after_s: 1,
        })
    }
}

async fn publish(
    State(node): State<Arc<Node>>,
    Publisher(c): Publisher,
    Topic(topic): Topic,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    may_publish(&node, &c, &topic)?;
    require_json(&headers)?;
    let kind = event_kind(
        headers
            .get("weft-event-type")
            .map(|v| v.to_str().unwrap_or("\n")),
    )?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k),
            _ => {
                return Err(ApiError::bad(
                    "Idempotency-Key must be 1-255 visible ASCII characters",
                ))
            }
        },
    };
    let limits = &node.config.limits;
    let bytes = read_body(&headers, body, limits.max_message_bytes).await?;
    let data = event_data(&bytes, limits)?;
    let published = node.publish(&topic, data, kind, key).await?;
    if published.conflict {
        return Err(ApiError::Unprocessable(
            "this Idempotency-Key was used with a different body".into(),
        ));
    }
    let mut resp = json_ok(publish_result_json(
        &topic,
        &published.epoch,
        published.offset,
    ));
    if published.duplicate {
        resp.headers_mut().insert(
            "idempotent-replayed",
            "true".parse().expect("static header"),
        );
    } else {
        *resp.status_mut() = StatusCode::CREATED;
    }
    Ok(resp)
}

/// `POST /v1/publish/stream` ([`crate::transport::publish_stream`]): every line is
/// checked against the caller's permissions like a single publish.
async fn publish_stream(
    State(node): State<Arc<Node>>,
    Publisher(c): Publisher,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    crate::transport::publish_stream::publish_stream(node, headers, body, move |node, topic| {
        may_publish(node, &c, topic)
    })
    .await
}

async fn batch_publish(
    State(node): State<Arc<Node>>,
    Publisher(c): Publisher,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let limits = &node.config.limits;
    let bytes = read_body(&headers, body, limits.max_batch_bytes).await?;
    let batch: BatchPublish =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid batch: {e}")))?;
    if batch.events.len() > limits.max_batch_events {
        return Err(ApiError::TooLarge(format!(
            "batch has {} events; the limit is {}",
            batch.events.len(),
            limits.max_batch_events
        )));
    }
    // Everything is validated before anything is published: a batch is all or nothing
    // as far as input errors go.
    let mut prepared = Vec::with_capacity(batch.events.len());
    for (i, item) in batch.events.iter().enumerate() {
        validate_topic(&item.topic)
            .map_err(|e| ApiError::bad(format!("events[{i}]: invalid topic: {e}")))?;
        let kind = event_kind(item.kind.as_deref())
            .map_err(|e| ApiError::bad(format!("events[{i}]: {e}")))?;
        let data = raw_data(&item.data, limits).map_err(|e| match e {
            ApiError::BadRequest(m) => ApiError::bad(format!("events[{i}]: {m}")),
            other => other,
        })?;
        may_publish(&node, &c, &item.topic)?;
        prepared.push((item.topic.as_str(), kind, data));
    }
    let mut out = BytesMut::with_capacity(16 + prepared.len() * 64);
    out.extend_from_slice(b"{\"results\":[");
    // Every event is started before any is awaited: forwarded ones go out on their
    // owners' links back to back, in batch order.
    let tickets: Vec<_> = prepared
        .into_iter()
        .map(|(topic, kind, data)| (topic, node.start_publish(topic, data, kind, None)))
        .collect();
    for (i, (topic, ticket)) in tickets.into_iter().enumerate() {
        let p = node.finish_publish(ticket).await?;
        if i > 0 {
            out.extend_from_slice(b",");
        }
        write_publish_result(&mut out, topic, &p.epoch, p.offset);
    }
    out.extend_from_slice(b"]}");
    let mut resp = json_ok(out.freeze());
    *resp.status_mut() = StatusCode::CREATED;
    Ok(resp)
}

async fn state(
    State(node): State<Arc<Node>>,
    Topic(topic): Topic,
    Who(c): Who,
) -> Result<Response, ApiError> {
    may_read(&node, &c, &topic)?;
    node.ready_topic(&topic, None).await?;
    let (cursor, last) = node.registry.with_topic(&topic, |t| t.state())?;
    let mut out = BytesMut::with_capacity(128);
    out.extend_from_slice(b"{\"topic\":\"");
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(b"\",\"epoch\":\"");
    out.extend_from_slice(cursor.epoch.as_bytes());
    out.extend_from_slice(b"\",\"offset\":");
    put_u64(&mut out, cursor.offset);
    out.extend_from_slice(b",\"last\":");
    match last {
        Some(ev) => ev.write_json(&mut out),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b"}");
    Ok(json_ok(out.freeze()))
}

async fn presence(
    State(node): State<Arc<Node>>,
    Topic(topic): Topic,
    Who(c): Who,
) -> Result<Response, ApiError> {
    require(&node, &c, Op::Presence(&topic), true)?;
    let ns = node.registry.namespaces.lookup(&topic);
    if !ns.presence {
        return Err(ApiError::Forbidden(format!(
            "presence is off for the namespace of `{topic}`"
        )));
    }
    let clients = node
        .registry
        .get(&topic)
        .map(|t| t.presence(1000))
        .unwrap_or_default();
    let body = weft_proto::PresenceResult { topic, clients };
    Ok(json_ok(Bytes::from(
        serde_json::to_vec(&body).expect("serialises"),
    )))
}

async fn events(
    State(node): State<Arc<Node>>,
    Topic(topic): Topic,
    Who(c): Who,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    may_read(&node, &c, &topic)?;
    let q = query(&uri);
    let limits = &node.config.limits;
    let limit = match param(&q, "limit") {
        None => limits.max_history_request,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 && n <= limits.max_history_request => n,
            _ => {
                return Err(ApiError::bad(format!(
                    "`limit` must be an integer from 1 to {}",
                    limits.max_history_request
                )))
            }
        },
    };
    let watch = parse_bool(param(&q, "watch"), "watch")?;
    let wait = match param(&q, "wait") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(s) if s <= limits.max_wait_s => Some(s),
            _ => {
                return Err(ApiError::bad(format!(
                    "`wait` must be an integer from 0 to {}",
                    limits.max_wait_s
                )))
            }
        },
    };
    let ndjson = accepts(&headers, "application/x-ndjson");
    let sse = !ndjson && (watch || accepts(&headers, "text/event-stream"));
    // On an SSE reconnect the browser repeats the original URL and sends the newer
    // position as Last-Event-ID, so the header wins over `since`. A malformed one is
    // refused on every form of the route (it is a cursor wherever it is sent), an
    // empty one is no cursor (what EventSource sends before its first id).
    let resume = last_event_id(&headers)?.filter(|id| !id.is_empty());
    if let Some(id) = resume {
        crate::input::parse_cursor(id, "Last-Event-ID")?;
    }
    let since_text = match (sse, resume) {
        (true, Some(id)) => Some(id),
        _ => param(&q, "since"),
    };
    let since = parse_since(since_text)?;
    if ndjson || sse {
        let format = if sse { Format::Sse } else { Format::Ndjson };
        let cursors = since
            .map(|c| MultiCursor {
                entries: vec![(topic.clone(), c)],
            })
            .unwrap_or_default();
        return stream::open(node, c, format, vec![topic], cursors).await;
    }
    match wait {
        Some(wait) => poll::long_poll(node, topic, since, limit, wait).await,
        None => {
            node.ready_topic(&topic, since.as_ref()).await?;
            poll::page(&node, &topic, since.as_ref(), limit)
        }
    }
}

async fn multi_events(
    State(node): State<Arc<Node>>,
    Who(c): Who,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q = query(&uri);
    let max = node.config.limits.max_topics_per_watch;
    // The limit counts `topic` parameters, repeats included, as the contract says: a
    // request cannot make the node scan an unbounded list by repeating one name.
    let mut topics: Vec<String> = Vec::new();
    let mut named = 0;
    for (k, v) in &q {
        if k == "topic" {
            named += 1;
            if named > max {
                return Err(ApiError::bad(format!("at most {max} topics per watch")));
            }
            validate_topic(v).map_err(|e| ApiError::bad(format!("invalid topic `{v}`: {e}")))?;
            if !topics.iter().any(|t| t == v) {
                topics.push(v.to_string());
            }
        }
    }
    if topics.is_empty() {
        return Err(ApiError::bad("name at least one `topic`"));
    }
    for t in &topics {
        may_read(&node, &c, t)?;
    }
    let ndjson = accepts(&headers, "application/x-ndjson");
    let watch = parse_bool(param(&q, "watch"), "watch")?;
    if !ndjson && !watch && !accepts(&headers, "text/event-stream") {
        return Err(ApiError::bad(
            "multi-topic reads are watches: add watch=true or Accept: text/event-stream",
        ));
    }
    let since_text = match last_event_id(&headers)? {
        Some(id) if !id.is_empty() && !ndjson => Some(id),
        _ => param(&q, "since"),
    };
    let cursors = match since_text {
        Some(s) => {
            MultiCursor::parse(s, max).map_err(|e| ApiError::bad(format!("bad cursor: {e}")))?
        }
        None => MultiCursor::default(),
    };
    let format = if ndjson {
        Format::Ndjson
    } else {
        Format::MultiSse
    };
    stream::open(node, c, format, topics, cursors).await
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        json_ok(Bytes::from_static(b"{\"ready\":true}"))
    } else {
        ApiError::Unavailable {
            message: node.unready_reason().into(),
            retry_after_s: 1,
        }
        .into_response()
    }
}

async fn cluster(State(node): State<Arc<Node>>, _: ClusterViewer) -> Result<Response, ApiError> {
    let body = match node.cluster.get() {
        Some(c) => {
            let mut body = c.describe();
            if let Some(relay) = node.relay.get() {
                body["this_node"]["relay_links"] = serde_json::json!(relay.linked_peers());
            }
            body
        }
        None => serde_json::json!({ "node": node.config.node_id, "mode": "standalone" }),
    };
    Ok(json_ok(Bytes::from(body.to_string())))
}

/// `POST /v1/admin/drain`: drain as on SIGTERM — readiness false, topics handed to
/// their new owners, sessions closed gradually over the grace period — then exit.
async fn admin_drain(State(node): State<Arc<Node>>, _: Admin) -> Result<Response, ApiError> {
    node.request_drain();
    let mut resp = json_ok(Bytes::from_static(b"{\"draining\":true}"));
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    sub: Option<String>,
    jti: Option<String>,
    /// Unix seconds: tokens of `sub` / with `jti` are refused until then.
    until: u64,
}

/// `POST /v1/admin/revoke {"sub"|"jti", "until"}`: closes the matching sessions on
/// this node and, through the relay, on every linked node, and refuses those tokens
/// until `until`.
async fn admin_revoke(
    State(node): State<Arc<Node>>,
    _: Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let bytes = read_body(&headers, body, 4096).await?;
    let r: RevokeRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("invalid revoke request: {e}")))?;
    let target = match (r.sub, r.jti) {
        (Some(s), None) if !s.is_empty() => crate::auth::revoke::Target::Sub(s),
        (None, Some(j)) if !j.is_empty() => crate::auth::revoke::Target::Jti(j),
        _ => return Err(ApiError::bad("name exactly one of `sub` or `jti`")),
    };
    let until = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs(r.until))
        .ok_or_else(|| ApiError::bad("`until` is out of range"))?;
    node.auth.revoke(target.clone(), until)?;
    // In a cluster every other node closes the user's sessions too.
    let peers = node
        .relay
        .get()
        .map_or(0, |relay| relay.broadcast_revoke(&target, r.until));
    Ok(json_ok(Bytes::from(format!(
        "{{\"revoked\":true,\"peers\":{peers}}}"
    ))))
}

/// `GET /v1/cluster/owner/{topic}`: the topic's owner under this node's ring.
async fn cluster_owner(
    State(node): State<Arc<Node>>,
    _: ClusterViewer,
    Topic(topic): Topic,
) -> Result<Response, ApiError> {
    let body = match node.cluster.get() {
        Some(c) => c.describe_owner(&topic),
        None => serde_json::json!({
            "topic": topic,
            "owner": node.config.node_id,
            "ring_version": 0,
        }),
    };
    Ok(json_ok(Bytes::from(body.to_string())))
}

async fn metrics() -> Response {
    let text = crate::stats::render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
