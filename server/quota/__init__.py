"""Who may call and how much: client keys (`keys`, and the stored ones in `keystore`), per-minute limits and
budgets with their holds (`limits`), and a request's admission (`admission`).

May import `policy` (which candidates a request has), `upstream`, `store`, `telemetry`, `config`, `errors` and
`outcome`; never `snapshot`, `gateway` or `api`.
"""
