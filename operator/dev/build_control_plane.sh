#!/usr/bin/env bash
# Build the control-plane binaries `orca dev cluster` and the Kubernetes tests run: etcd from
# Debian, kube-apiserver, kube-controller-manager and kube-scheduler 1.20 from Debian's kubernetes
# source package (its orig tarball vendors every dependency). About 7 minutes on two cores;
# the result is cached, and KUBEBUILDER_ASSETS pointing at existing binaries skips all of it.
set -euo pipefail

ASSETS="${KUBEBUILDER_ASSETS:-$HOME/.cache/orca/envtest/bin}"
BINARIES="kube-apiserver kube-controller-manager kube-scheduler"
# Names what the sources were patched with (below); a cache built without it is rebuilt.
BUILD_ID="1.20.2+loopback-endpoints"
have_all() {
  for b in etcd $BINARIES; do [ -x "$ASSETS/$b" ] || return 1; done
  [ "$(cat "$ASSETS/build-id" 2>/dev/null)" = "$BUILD_ID" ]
}
if have_all; then
  echo "$ASSETS"
  exit 0
fi
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks one of etcd $BINARIES, or its build-id is not $BUILD_ID" >&2
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

# 4. `orca dev node` gives each pod its own loopback address (127.0.x.y), and Endpoints must carry
#    them: drop the API server's refusal of loopback endpoint addresses (nothing else changes).
VALIDATION=pkg/apis/core/validation/validation.go
perl -0pi -e 's/\tif ip\.IsLoopback\(\) \{\n[^\n]*loopback range[^\n]*\n\t\}\n//' "$VALIDATION"
if grep -q 'may not be in the loopback range' "$VALIDATION"; then
  echo "could not patch $VALIDATION" >&2
  exit 1
fi

# 5. Build in a GOPATH layout.
mkdir -p .go/src/k8s.io
[ -e .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
echo "building $BINARIES from source, once (cached in $ASSETS)" >&2
GOPATH="$PWD/.go" CGO_ENABLED=0 make WHAT="$(for b in $BINARIES; do printf 'cmd/%s ' "$b"; done)" >&2
for b in $BINARIES; do cp "_output/bin/$b" "$ASSETS/"; done
echo "$BUILD_ID" > "$ASSETS/build-id"
ln -sf "$(command -v etcd)" "$ASSETS/etcd"
echo "$ASSETS"
