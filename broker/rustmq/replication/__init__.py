"""The cluster-mode runtime: leases, the controller, state sync and follower fetchers (asyncio).

It drives the sans-IO rules of rustmq.cluster against an ObjectStore (the Kubernetes API in
production, injected by rustmq.app) and keeps the request path's rustmq.server.replicated view
current. It sits above the server and the client layers: followers fetch from their leaders
with the client's Connection.
"""
