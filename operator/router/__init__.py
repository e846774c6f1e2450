"""`orca router`: the request path of an OrcaDeployment.

Clients talk to the router's Service; the router sends each request to the least-loaded ready
replica, judged by the replicas' own /ready and /metrics rather than by Kubernetes' slower view.
`policy` picks, `endpoints` finds the replicas, `replicas` probes them, `proxy` relays the bytes.
"""
