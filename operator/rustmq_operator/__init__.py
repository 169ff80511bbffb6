"""RustMQ operator: reconciles RustMQCluster resources into running broker clusters (kopf).

The operator never imports the broker package: the two meet only at the CRD and the broker's
network API, so either can be released on its own.
"""

__version__ = "0.1.0"
