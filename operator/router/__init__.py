"""`orca router`: the request path of an OrcaDeployment.

Clients talk to the router's Service; the router sends each request to the best-scored ready
replica (queue, running batch, KV cache use), preferring the one likely to hold the prompt's prefix
in its cache, judged by the replicas' own /ready and /metrics rather than by Kubernetes' slower view.
`policy` picks, `prefix` remembers who served which prefix, `prompts` tokenizes and hashes prompts,
`endpoints` finds the replicas, `replicas` probes them, `proxy` relays the bytes.
"""
