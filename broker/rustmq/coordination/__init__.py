"""Consumer coordination: groups, committed offsets, queue subscriptions, idempotent producers.

Everything here is a sans-IO state machine: the caller passes the current time in (`now_ms`)
and performs the effects the state machines return (write a dead letter, answer a member).
Persistence goes through `rustmq.storage.PartitionLog` only (see `journal`), so these modules
are testable with real files and no sockets, and the server wires them to its requests.

* `assignment`  sticky, balanced partition assignment (pure function)
* `group`       group membership, heartbeats, session timeouts, generations, rebalances
* `journal`     a compacting key/value journal on a PartitionLog (snapshot + tail)
* `offsets`     durable committed offsets per (group, topic, partition) and lag
* `queue`       per-message-ack subscriptions: leases, redelivery, dead letters, delays, TTL,
                priorities, with the acked set persisted as ack floor + sparse ranges
* `producers`   idempotent producer ids and per-partition sequence checks
* `queue_log`   queue delivery against PartitionLogs: fill, read leased batches, dead letters
* `service`     `Coordinator`: all of the above for one broker, behind typed calls
"""
