"""The workers behind the gateway: the registry of workers and their leases (`workers`), health and load
polling (`load`), resilience (breakers, gates, retry budget, timeouts: `resilience`), the pooled client
(`client`), forwarding with retries and fallbacks (`forward`), and relaying streams (`relay`, `sse`).

May import `telemetry` (the request's record), `config`, `errors`, `outcome` and `tasks`; never `policy`,
`quota` or anything above them.
"""
