# hivemind's container image: `docker build -t hivemind .` from the repository root.
#
# Three build stages: cargo-chef turns the manifests into a recipe, the dependencies are built
# from the recipe alone (a layer that stays cached until Cargo.toml/Cargo.lock change), then the
# sources. The runtime stage is distroless (glibc, no shell, no package manager) and runs as an
# unprivileged user. test/packaging.rs checks these invariants (containers cannot run on the
# machines the tests run on).

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin hivemind
COPY . .
RUN cargo build --release --locked --bin hivemind
RUN strip target/release/hivemind

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /build/target/release/hivemind /usr/local/bin/hivemind
# Every setting with its default (the same file as config/hivemind.yaml), and the example rules
# where a volume or a ConfigMap replaces them.
COPY config/hivemind.yaml /etc/hivemind/hivemind.yaml
COPY config/ratelimit.yaml /etc/hivemind/rules/ratelimit.yaml
ENV HIVEMIND_SETTINGS=/etc/hivemind/hivemind.yaml \
    HIVEMIND_RULES__PATH=/etc/hivemind/rules
# distroless's "nonroot" user and group.
USER 65532:65532
# gRPC (rate limit service), admin HTTP, gossip mesh. They listen on loopback unless configured
# (HIVEMIND_GRPC__ADDR, HIVEMIND_ADMIN__ADDR, HIVEMIND_MESH__ADDR): a sidecar's Envoy shares the
# pod's loopback; a mesh reachable from other pods needs HIVEMIND_MESH__SECRET.
EXPOSE 8081/tcp 8080/tcp 7946/udp
# The probe runs inside the container, where the loopback admin port is reachable.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/hivemind", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/hivemind"]
