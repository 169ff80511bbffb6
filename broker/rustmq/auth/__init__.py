"""Authentication, authorisation and quotas, as pure rules over plain data (docs/security.md).

``tokens``: hashed token files and the check of a presented token; ``acl``: the policy file
(default mode, super-users, allow/deny rules with prefix patterns, quotas) and the one table that
maps every request to the resource verbs it needs; ``quotas``: the rate limiters. Nothing here
does socket or event-loop I/O: ``rustmq.server.authz`` reloads the files and hooks the rules
into connections, ``rustmq.admin`` into the HTTP API.
"""
