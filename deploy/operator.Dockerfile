# syntax=docker/dockerfile:1.7
# The gpuvm operator image: gpuvm-operator (and crdgen) on distroless, non-root.
#   docker build -f deploy/operator.Dockerfile -t ghcr.io/gpuvm/gpuvm-operator:0.1.0 .
# Built from the repository root (the workspace needs every member's Cargo.toml).

FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
# --locked: the image gets exactly the dependencies of Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gpuvm-operator --bins \
 && install -D -m 0755 target/release/gpuvm-operator /out/gpuvm-operator \
 && install -D -m 0755 target/release/crdgen /out/crdgen

# cc-debian12: glibc + libgcc, which a Rust binary links against; no shell, no package
# manager. The operator only talks HTTPS to the API server (rustls, webpki roots from
# the service account's CA) and serves :8080.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/gpuvm-operator /out/crdgen /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/gpuvm-operator"]
