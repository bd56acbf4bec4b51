"""Schemathesis hooks for node/tests/schemathesis_contract.rs.

- `POST /v1/publish/stream` takes NDJSON (application/x-ndjson); its schema is a string
  (the lines), so the body is sent as that text, as for text/plain.
- A multi-topic cursor (`since` of `GET /v1/events`) names each topic once; the
  document says so in words because JSON Schema cannot (a pattern cannot forbid a
  repeat), and the server refuses a repeat with 400. Generated cursors that repeat a
  topic are dropped rather than sent as "valid".
- After a `101 Switching Protocols` (`GET /v1/ws`) the connection belongs to the
  WebSocket session, as it would for any WebSocket client; requests does not know that
  and would put it back in its pool, sending the next HTTP request into the WebSocket
  (the node then answers with a close frame). So the body of a 101 is empty (it has
  none) and its connection is closed instead of reused.
"""

import requests.adapters
import schemathesis

schemathesis.serializer.alias("application/x-ndjson", "text/plain")


@schemathesis.hook
def filter_query(ctx, query):
    if ctx.operation is None or ctx.operation.path != "/v1/events" or not query:
        return True
    since = query.get("since")
    if not isinstance(since, str):
        return True
    topics = [entry.split("=", 1)[0] for entry in since.split(",")]
    return len(topics) == len(set(topics))


_build_response = requests.adapters.HTTPAdapter.build_response


def _build_response_closing_upgrades(self, req, resp):
    response = _build_response(self, req, resp)
    if response.status_code == 101:
        response._content = b""
        resp.close()
        resp.release_conn()
    return response


requests.adapters.HTTPAdapter.build_response = _build_response_closing_upgrades
