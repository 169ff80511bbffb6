"""``rustmq-operator``: run the operator against the in-cluster service account or a kubeconfig.

Equivalent to ``kopf run --standalone -m rustmq_operator.handlers`` with the operator's
defaults: a liveness endpoint for the Deployment's probe and either all namespaces or the ones
named with ``--namespace``. Standalone because the chart runs exactly one replica with the
Recreate strategy, so kopf's peering objects would add RBAC and nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rustmq-operator", description="Reconcile RustMQCluster resources into broker clusters."
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], metavar="NS",
        help="watch this namespace (repeatable; a glob such as 'team-*' works too)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument(
        "--liveness", default=os.environ.get("RUSTMQ_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint URL, or 'none' (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("RUSTMQ_OPERATOR_METRICS_PORT", "0")),
        help="serve the operator's Prometheus metrics on this port (0: off; the chart uses 8081)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    os.environ["RUSTMQ_OPERATOR_METRICS_PORT"] = str(args.metrics_port)
    import kopf

    from rustmq_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, debug=args.debug)
    if not (args.verbose or args.debug):
        # kopf reports every handled watch event at INFO; the reconciler logs what it changes.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    namespaces = [ns for ns in args.namespace if ns]
    liveness = None if args.liveness.lower() == "none" else args.liveness
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
