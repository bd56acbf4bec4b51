# syntax=docker/dockerfile:1
# Weft container image: weft-node, weft-router and weft-loadtest on a small non-root
# runtime. No HEALTHCHECK on purpose: Kubernetes probes /healthz and /readyz (the Helm
# chart in helm/weft wires them), and a Docker HEALTHCHECK would only duplicate them.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" \
#     --build-arg VERSION=0.1.0 --build-arg SOURCE_URL=https://github.com/<you>/weft -t weft:dev .
#
# Build args (all optional; they only feed labels and weft_build_info):
#   GIT_COMMIT  the commit built: org.opencontainers.image.revision and
#               weft_build_info{commit} ("unknown" if not given)
#   VERSION     org.opencontainers.image.version (default: the workspace version in
#               Cargo.toml; helm_chart.rs checks that they agree)
#   SOURCE_URL  org.opencontainers.image.source (default: the chart's `home` in
#               helm/weft/Chart.yaml; set it to the repository you build from)
#   DOCS_URL    org.opencontainers.image.documentation (default: the chart's README
#               under SOURCE_URL)

# The toolchain the workspace is built and tested with (rust-version in Cargo.toml is the floor).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Shown by weft_build_info{commit=...} on /metrics.
ARG GIT_COMMIT=unknown
ENV WEFT_GIT_COMMIT=${GIT_COMMIT} \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
# Every workspace member (Cargo.toml's [workspace] members) and the lock file: cargo
# loads the whole workspace, including the dev-only weft-testkit, before it builds
# anything. node/tests/helm_chart.rs fails when a member is missing here.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY router router
COPY node node
COPY loadtest loadtest
COPY testkit testkit
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weft-node -p weft-router -p weft-loadtest \
 && mkdir -p /out \
 && cp target/release/weft-node target/release/weft-router target/release/weft-loadtest /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG GIT_COMMIT=unknown
ARG VERSION=0.1.0
ARG SOURCE_URL=https://github.com/weft/weft
ARG DOCS_URL=${SOURCE_URL}/blob/main/helm/weft/README.md
LABEL org.opencontainers.image.title="weft" \
      org.opencontainers.image.description="Weft real-time connection fabric: weft-node, weft-router, weft-loadtest" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.documentation="${DOCS_URL}"
# bash stays (the chart's preStop hook talks HTTP through /dev/tcp, so the image needs
# no curl); nothing else is added to the slim base. uid/gid 10001 own the data dir.
RUN groupadd --system --gid 10001 weft \
 && useradd --system --uid 10001 --gid weft --home-dir /var/lib/weft --shell /usr/sbin/nologin weft \
 && mkdir -p /var/lib/weft \
 && chown weft:weft /var/lib/weft
COPY --from=build /out/weft-node /out/weft-router /out/weft-loadtest /usr/local/bin/
# The CA bundle for outgoing TLS: an https:// auth.jwks URL (weft-node loads the system
# roots) and https:// load-test targets. Copied from the build stage (rust:*-bookworm
# ships ca-certificates), so the runtime needs no apt-get; SSL_CERT_FILE names it.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 10001:10001
WORKDIR /var/lib/weft
ENV WEFT_DATA_DIR=/var/lib/weft \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# HTTP (REST, WebSocket, SSE, metrics), public gRPC, cluster (relay, router), router.
EXPOSE 8080 9000 9100 9400
ENTRYPOINT ["/usr/local/bin/weft-node"]
