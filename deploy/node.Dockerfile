# syntax=docker/dockerfile:1.7
# The gpuvm node image: the node agent (gpuvm-node) and, under /opt/gpuvm-dist, the
# payload the chart's installer copies onto each GPU node's /opt/gpuvm:
#   bin/containerd-shim-gpuvm-v1   the containerd shim (runtime io.containerd.gpuvm.v1)
#   bin/cloud-hypervisor           the VMM (static release binary)
#   bin/virtiofsd                  the container rootfs share
#   bin/vhost-device-vsock         vsock for the QEMU backend
#   share/vmlinux                  the guest kernel (guest/build.sh)
#   share/initramfs.img            the guest initramfs with gpuvm-agent as /init
#   share/initramfs-gpu.img        the GPU flavour (guest/build.sh --gpu): NVIDIA driver
#                                  550.163.01, booted by pods with GPUs
#
#   docker build -f deploy/node.Dockerfile -t ghcr.io/gpuvm/gpuvm-node:0.1.0 .
#
# Everything copied to the host is statically linked (glibc with crt-static, as
# guest/build.sh does for the agent), so it runs whatever the host's libraries are.
# QEMU is not shipped: it needs its own libraries and firmware; hosts that use the qemu
# backend install it from their distribution.

ARG CLOUD_HYPERVISOR_VERSION=v45.0
ARG VIRTIOFSD_VERSION=1.13.2
ARG VHOST_DEVICE_VSOCK_VERSION=0.3.0

FROM docker.io/library/rust:1-bookworm AS build
ARG VIRTIOFSD_VERSION
ARG VHOST_DEVICE_VSOCK_VERSION
# virtiofsd links libseccomp and libcap-ng (their .a for a static build); guest/build.sh
# needs python3 and apt-get download for the kernel package.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libseccomp-dev libcap-ng-dev python3 \
 && rm -rf /var/lib/apt/lists/*
ENV STATIC="-C target-feature=+crt-static" TARGET=x86_64-unknown-linux-gnu
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gpuvm-node \
 && install -D -m 0755 target/release/gpuvm-node /out/gpuvm-node \
 && RUSTFLAGS="$STATIC" cargo build --release --locked -p gpuvm-shim --target "$TARGET" \
 && install -D -m 0755 "target/$TARGET/release/containerd-shim-gpuvm-v1" /out/dist/bin/containerd-shim-gpuvm-v1
# The helpers, from crates.io, static for the same reason (--target keeps the flag off
# build scripts and proc macros).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    RUSTFLAGS="$STATIC" cargo install --locked --target "$TARGET" --root /tmp/helpers \
        virtiofsd@"$VIRTIOFSD_VERSION" vhost-device-vsock@"$VHOST_DEVICE_VSOCK_VERSION" \
 && install -m 0755 /tmp/helpers/bin/virtiofsd /tmp/helpers/bin/vhost-device-vsock /out/dist/bin/
# The guest kernel and initramfs (reproducible: same inputs, same bytes; see guest/README.md).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    apt-get update \
 && CARGO_TARGET_DIR=/src/target guest/build.sh /tmp/guest \
 && install -D -m 0644 /tmp/guest/vmlinux /out/dist/share/vmlinux \
 && install -D -m 0644 /tmp/guest/initramfs.cpio.gz /out/dist/share/initramfs.img \
 && install -D -m 0644 /tmp/guest/manifest.json /out/dist/share/guest-manifest.json \
 && scripts/guest-gpu-deps.sh \
 && CARGO_TARGET_DIR=/src/target guest/build.sh --gpu /tmp/guest-gpu \
 && install -D -m 0644 /tmp/guest-gpu/initramfs.cpio.gz /out/dist/share/initramfs-gpu.img \
 && install -D -m 0644 /tmp/guest-gpu/manifest.json /out/dist/share/guest-gpu-manifest.json \
 && rm -rf /var/lib/apt/lists/*

# Cloud Hypervisor publishes a static binary per release.
FROM docker.io/library/debian:bookworm-slim AS cloud-hypervisor
ARG CLOUD_HYPERVISOR_VERSION
ADD --chmod=0755 https://github.com/cloud-hypervisor/cloud-hypervisor/releases/download/${CLOUD_HYPERVISOR_VERSION}/cloud-hypervisor-static /cloud-hypervisor

# Debian slim, not distroless: the installer is a bash script that needs nsenter
# (util-linux), cmp (diffutils), find and awk, and the cleanup
# DaemonSet's pause container needs /bin/sh.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux diffutils findutils mawk \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/gpuvm-node /usr/local/bin/gpuvm-node
COPY --from=build /out/dist/ /opt/gpuvm-dist/
COPY --from=cloud-hypervisor /cloud-hypervisor /opt/gpuvm-dist/bin/cloud-hypervisor
# Root, on purpose: binding GPUs to vfio-pci writes root-owned sysfs files
# (driver_override, unbind, drivers_probe), and the installer writes root-owned host
# files and enters PID 1's namespaces. The chart gives privilege only to the containers
# that do this, and runs the agent unprivileged (capabilities dropped, /sys read-only)
# with node.bind=false.
USER 0:0
ENTRYPOINT ["/usr/local/bin/gpuvm-node"]
