"""Schemathesis hooks for node/tests/schemathesis_contract.rs.

- `POST /v1/publish/stream` takes NDJSON (application/x-ndjson); its schema is a string
  (the lines), so the body is sent as that text, as for text/plain.
- A multi-topic cursor (`since` of `GET /v1/events`) names each topic once; the
  document says so in words because JSON Schema cannot (a pattern cannot forbid a
  repeat), and the server refuses a repeat with 400. Generated cursors that repeat a
  topic are dropped rather than sent as "valid".
"""

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
