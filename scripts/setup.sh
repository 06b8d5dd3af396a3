#!/usr/bin/env bash
# Installs the system packages meshauth needs to build and test: clang and libbpf headers for the
# eBPF programs, bpftool for verifier checks, protoc for the gRPC definitions, and the network
# tools the lab and its benchmarks use. Idempotent; run as root.
set -euo pipefail

packages=(
  clang-16 llvm-16 libbpf-dev bpftool libelf-dev pkg-config   # eBPF C programs
  protobuf-compiler libprotobuf-dev                            # gRPC definitions
  iproute2 iputils-ping iperf3 sockperf                        # lab and benchmarks
  iptables                                                     # the agent's hold queue rule (NFQUEUE)
  podman runc busybox-static                                   # CNI plugin tests: containers from a local rootfs
  tcpdump stunnel4                                             # encryption tests (underlay capture) and benchmark (mTLS baseline)
  etcd-server                                                  # the etcd datastore's tests (a real etcd 3.4)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing packages: ${missing[*]}; run this script as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
