"""Prometheus families for cluster mode (docs/cluster.md), computed when /metrics is scraped.

Two kinds, so that a sum over brokers never counts a partition twice (Kafka's convention):

- per broker, from its own roles (rustmq.server.replicated.ClusterRoles): what it leads and
  hosts, and, for the partitions it leads, their in-sync replica counts;
- cluster-wide, only on the controller (from its latest health report, the same facts the
  operator reads in ``<cluster>-health``): offline and reassigning partitions, bytes left to
  move, replicas/leaders/in-sync replicas per broker. Elsewhere these families are empty.

``rustmq_offline_partitions`` and ``rustmq_under_replicated_partitions`` are the names the
operator's PrometheusRule alerts on with ``max(...) > 0`` (docs/operator.md).

    rustmq_cluster_leader_partitions                       partitions this broker leads
    rustmq_cluster_replica_partitions                      replicas this broker hosts
    rustmq_under_replicated_partitions             led here, in-sync replicas < replication factor
    rustmq_cluster_under_min_isr_partitions                led here, in-sync replicas < min_insync_replicas
    rustmq_cluster_partition_in_sync_replicas{topic,partition}   led here
    rustmq_cluster_partition_replicas{topic,partition}           led here (reassignment: old + new)
    rustmq_cluster_controller                              1 on the controller, else 0
    rustmq_offline_partitions                      controller only: partitions without a leader
    rustmq_cluster_partitions                              controller only
    rustmq_cluster_reassigning_partitions                  controller only
    rustmq_cluster_reassign_bytes_remaining                controller only (estimate, docs/cluster.md)
    rustmq_cluster_leader_skew                             controller only: most - fewest leaderships of a member
    rustmq_cluster_topic_leader_skew                       controller only: the same within a topic, the worst topic
    rustmq_cluster_leaders_not_preferred                   controller only: partitions not led by their first replica
    rustmq_cluster_broker_{replicas,leaders,in_sync_replicas,log_bytes}{broker}   controller only
    rustmq_cluster_broker_alive{broker}                    controller only
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def collect(cluster: Any) -> Iterator[Any]:
    """Families for `cluster` (a ClusterRoles, or None in standalone mode)."""
    if cluster is None:
        return
    me = cluster.broker_id
    led = under = under_min = hosted = 0
    isr = GaugeMetricFamily("rustmq_cluster_partition_in_sync_replicas", "In-sync replicas of a partition led here",
                            labels=["topic", "partition"])
    replicas = GaugeMetricFamily("rustmq_cluster_partition_replicas", "Replicas of a partition led here",
                                 labels=["topic", "partition"])
    for (name, index), role in sorted(cluster.roles.items()):
        hosted += 1
        if role.tracker is None or role.leader != me:
            continue
        led += 1
        topic = cluster.topics.get(name)
        rf = topic.replication_factor if topic is not None else len(role.replicas)
        under += len(role.isr) < rf
        under_min += len(role.isr) < role.min_insync
        isr.add_metric([name, str(index)], float(len(role.isr)))
        replicas.add_metric([name, str(index)], float(len(role.replicas)))
    yield _gauge("rustmq_cluster_leader_partitions", "Partitions this broker leads", led)
    yield _gauge("rustmq_cluster_replica_partitions", "Partition replicas this broker hosts", hosted)
    yield _gauge("rustmq_under_replicated_partitions",
                 "Partitions led here with fewer in-sync replicas than their replication factor", under)
    yield _gauge("rustmq_cluster_under_min_isr_partitions",
                 "Partitions led here with fewer in-sync replicas than min_insync_replicas (acks=all refused)", under_min)
    yield isr
    yield replicas
    health = cluster.health if cluster.controller == me else None
    yield _gauge("rustmq_cluster_controller", "1 on the broker that is the controller", float(health is not None))
    if health is None:
        return
    yield _gauge("rustmq_cluster_partitions", "Partitions in the cluster (controller only)", health["partitions"])
    yield _gauge("rustmq_offline_partitions", "Partitions without a leader (controller only)", health["offline"])
    yield _gauge("rustmq_cluster_reassigning_partitions", "Partitions being moved (controller only)", health["reassigning"])
    yield _gauge("rustmq_cluster_reassign_bytes_remaining",
                 "Estimated bytes the replicas being added still have to copy (controller only)", health["bytesToMove"])
    yield _gauge("rustmq_cluster_leader_skew",
                 "Most minus fewest partitions led by one member broker (controller only)", health["leaderSkew"])
    yield _gauge("rustmq_cluster_topic_leader_skew",
                 "Most minus fewest leaderships of one topic on a member broker, worst topic (controller only)",
                 health["topicLeaderSkew"])
    yield _gauge("rustmq_cluster_leaders_not_preferred",
                 "Partitions led by another replica than their preferred first one (controller only)",
                 health["leadersNotPreferred"])
    per_broker = {
        "replicas": ("rustmq_cluster_broker_replicas", "Replicas a broker holds (controller only)"),
        "leaders": ("rustmq_cluster_broker_leaders", "Partitions a broker leads (controller only)"),
        "inSyncReplicas": ("rustmq_cluster_broker_in_sync_replicas", "In-sync replicas a broker holds (controller only)"),
        "bytes": ("rustmq_cluster_broker_log_bytes", "Log bytes a broker holds, from its Lease (controller only)"),
        "alive": ("rustmq_cluster_broker_alive", "1 while a broker's Lease is live (controller only)"),
    }
    families = {key: GaugeMetricFamily(name, text, labels=["broker"]) for key, (name, text) in per_broker.items()}
    for broker, facts in health["brokers"].items():
        for key, family in families.items():
            family.add_metric([broker], float(facts[key]))
    yield from families.values()
