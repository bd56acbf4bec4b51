# syntax=docker/dockerfile:1
# Weft container image: weft-node, weft-router and weft-loadtest on a small non-root
# runtime. No HEALTHCHECK on purpose: Kubernetes probes /healthz and /readyz (the Helm
# chart in helm/weft wires them), and a Docker HEALTHCHECK would only duplicate them.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t weft:dev .

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
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY router router
COPY node node
COPY loadtest loadtest
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weft-node -p weft-router -p weft-loadtest \
 && mkdir -p /out \
 && cp target/release/weft-node target/release/weft-router target/release/weft-loadtest /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG GIT_COMMIT=unknown
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="weft" \
      org.opencontainers.image.description="Weft real-time connection fabric: weft-node, weft-router, weft-loadtest" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.documentation="helm/weft/README.md"
# bash stays (the chart's preStop hook talks HTTP through /dev/tcp, so the image needs
# no curl); nothing else is added to the slim base. uid/gid 10001 own the data dir.
RUN groupadd --system --gid 10001 weft \
 && useradd --system --uid 10001 --gid weft --home-dir /var/lib/weft --shell /usr/sbin/nologin weft \
 && mkdir -p /var/lib/weft \
 && chown weft:weft /var/lib/weft
COPY --from=build /out/weft-node /out/weft-router /out/weft-loadtest /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/weft
ENV WEFT_DATA_DIR=/var/lib/weft
# HTTP (REST, WebSocket, SSE, metrics), public gRPC, cluster (relay, router), router.
EXPOSE 8080 9000 9100 9400
ENTRYPOINT ["/usr/local/bin/weft-node"]
