#!/usr/bin/env bash
# Builds what the local deployment runs, then runs it: deploy/local/cluster.toml.
# Needs etcd on PATH (Debian: apt-get install etcd-server). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v etcd >/dev/null || { echo "etcd not found: apt-get install etcd-server" >&2; exit 1; }
cargo build -q -p clustergo -p harbor -p gateway -p clusterctl --bins --examples
exec target/debug/clusterctl up deploy/local/cluster.toml "$@"
