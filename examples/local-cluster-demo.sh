#!/usr/bin/env bash
# The Kubernetes half of the product on one machine: the local control plane, the CRD, the
# operator, and the seed's RustMQCluster brought to Ready.
#   examples/local-cluster-demo.sh          ...then keep the operator running until Ctrl-C
#   examples/local-cluster-demo.sh --once   ...then stop the operator (the cluster stays up)
# Uses the cluster $KUBECONFIG names if it answers, otherwise `scripts/local-cluster up`.
# The namespace is $RUSTMQ_DEMO_NAMESPACE (default data-pipeline, as in the seed).
# kwok plays the kubelet, so the broker pods are Ready without running a container.
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
case "${1:-}" in
  --once) once=true ;;
  "") ;;
  *) echo "usage: examples/local-cluster-demo.sh [--once]" >&2; exit 2 ;;
esac
namespace=${RUSTMQ_DEMO_NAMESPACE:-data-pipeline}

scripts/setup
if bin_dir=$(tools/controlplane/build --print-dir 2>/dev/null); then
  export PATH="$bin_dir:$PATH"
fi
if [ -z "${KUBECONFIG:-}" ] || ! kubectl version --request-timeout=5s >/dev/null 2>&1; then
  scripts/local-cluster up >/dev/null
  eval "$(scripts/local-cluster env)"
fi

state=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for=condition=Established crd/rustmqclusters.rustmq.io --timeout=60s >/dev/null
free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
liveness=$(free_port)
metrics=$(free_port)
.venv/bin/rustmq-operator --liveness="http://127.0.0.1:$liveness/healthz" --metrics-port="$metrics" \
  >"$state/operator.log" 2>&1 &
pids+=($!)
# LoadBalancer addresses: `scripts/local-cluster up` runs an allocator; other clusters get one here.
.venv/bin/python tools/controlplane/lbipam.py --unless-running >"$state/lbipam.log" 2>&1 &
pids+=($!)

kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
sed "s/namespace: data-pipeline/namespace: $namespace/" examples/rustmq-minimal.yaml | kubectl apply -f - >/dev/null
if ! kubectl wait --for=condition=Ready "rmq/rustmq" -n "$namespace" --timeout=180s >/dev/null; then
  echo "the RustMQCluster did not become Ready; operator log:" >&2
  tail -40 "$state/operator.log" >&2
  exit 1
fi
for _ in $(seq 60); do  # the LB-IPAM helper assigns the external address within a moment
  [ -n "$(kubectl get rmq rustmq -n "$namespace" -o jsonpath='{.status.endpoints.external.ip}')" ] && break
  sleep 0.5
done
kubectl get rmq -n "$namespace"
cat <<TEXT

RustMQCluster $namespace/rustmq is Ready. Where to look:
  export KUBECONFIG=$KUBECONFIG PATH=$(dirname "$(command -v kubectl)"):\$PATH
  kubectl describe rmq rustmq -n $namespace        # conditions, endpoints, events
  kubectl get sts,pods,svc,pvc,pdb,cm -n $namespace
  kubectl scale rmq/rustmq -n $namespace --replicas=3
  curl -s localhost:$metrics/metrics | grep rustmq_operator_   # the operator's metrics
  operator log: $state/operator.log
TEXT
if ! $once; then
  echo "The operator keeps running; Ctrl-C stops it (the cluster stays: scripts/local-cluster down)."
  wait "${pids[0]}"
fi
