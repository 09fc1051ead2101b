# syntax=docker/dockerfile:1.7
# berth: a static musl binary on distroless/static (no shell, no libc).
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/berth-mirror/berth:0.1.0 .
# Each platform builds natively (QEMU under buildx for the other one), so the
# C parts of ring compile with that platform's musl-gcc.
# CI cannot run docker here; deploy/ci-validate.sh lints this file with hadolint
# and builds the same x86_64-unknown-linux-musl target to check it is static.

FROM rust:1.95-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
 && rustup target add "$target" \
 && cargo build --release --locked --bin berth --target "$target" \
 && install -D -m 0755 "target/$target/release/berth" /out/berth

# Pin by digest when publishing a release (distroless only publishes moving tags).
# hadolint ignore=DL3007
FROM gcr.io/distroless/static-debian12:latest
LABEL org.opencontainers.image.title="berth" \
      org.opencontainers.image.description="Node-local pull-through OCI registry mirror" \
      org.opencontainers.image.source="https://github.com/berth-mirror/berth" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/berth /usr/local/bin/berth
# Runs as root (distroless default) only to write the root-owned host paths
# it is given (cache, containerd's certs.d); the chart drops every capability.
EXPOSE 5050 9595
ENTRYPOINT ["/usr/local/bin/berth"]
CMD ["serve"]
