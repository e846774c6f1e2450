#!/usr/bin/env bash
# Build the control-plane binaries the Kubernetes tests run against (what envtest uses):
# etcd from Debian, kube-apiserver + kube-controller-manager 1.20 from Debian's kubernetes
# source package (its orig tarball vendors every dependency). About 5 minutes on two cores;
# the result is cached, and KUBEBUILDER_ASSETS pointing at existing binaries skips all of it.
set -euo pipefail

ASSETS="${KUBEBUILDER_ASSETS:-$HOME/.cache/orca/envtest/bin}"
if [ -x "$ASSETS/kube-apiserver" ] && [ -x "$ASSETS/kube-controller-manager" ] && [ -x "$ASSETS/etcd" ]; then
  echo "$ASSETS"
  exit 0
fi
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks etcd, kube-apiserver or kube-controller-manager" >&2
  exit 1
fi

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
WORK="$HOME/.cache/orca/envtest/src"
mkdir -p "$WORK" "$ASSETS"

# 1. Debian's source package (deb-src with the same mirror as the machine's bookworm entry).
if [ ! -f /etc/apt/sources.list.d/orca-deb-src.sources ]; then
  $SUDO tee /etc/apt/sources.list.d/orca-deb-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  $SUDO apt-get update -qq >&2
fi
# 2. Tool chain and etcd.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go rsync etcd-server \
  golang-github-modern-go-reflect2-dev openssl >&2

cd "$WORK"
ls kubernetes_*.orig.tar.* >/dev/null 2>&1 || apt-get source --download-only kubernetes >&2
SRCDIR="$WORK/kubernetes"
if [ ! -d "$SRCDIR" ]; then
  mkdir -p "$SRCDIR"
  tar -xf kubernetes_*.orig.tar.* -C "$SRCDIR" --strip-components=1
fi
cd "$SRCDIR"

# 3. Go 1.19 needs reflect2 1.0.2: the vendored 1.0.1 crashes kube-apiserver in map iteration.
REFLECT2_SRC="$(dpkg -L golang-github-modern-go-reflect2-dev | grep -m1 '/github.com/modern-go/reflect2$')"
if ! grep -q 'reflect2 v1.0.2' go.mod; then
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r "$REFLECT2_SRC" vendor/github.com/modern-go/reflect2
  sed -i 's#\(github.com/modern-go/reflect2 => github.com/modern-go/reflect2\) v1.0.1#\1 v1.0.2#' go.mod
  sed -i 's#\(github.com/modern-go/reflect2 => github.com/modern-go/reflect2\) v1.0.1#\1 v1.0.2#' vendor/modules.txt
  sed -i 's#^\# github.com/modern-go/reflect2 v1.0.1 => github.com/modern-go/reflect2 v1.0.1#\# github.com/modern-go/reflect2 v1.0.1 => github.com/modern-go/reflect2 v1.0.2#' vendor/modules.txt
fi

# 4. Build in a GOPATH layout.
mkdir -p .go/src/k8s.io
[ -e .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
GOPATH="$PWD/.go" CGO_ENABLED=0 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$ASSETS/"
ln -sf "$(command -v etcd)" "$ASSETS/etcd"
echo "$ASSETS"
