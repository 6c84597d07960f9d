"""Routing in the gateway: the routing table built from the config (`table`), per-request selection with
shadow and fallbacks (`selection`, `options`), the embedding service (`embedding`), session affinity
(`affinity`), feedback records (`feedback`) and the bandits' sharing across replicas (`bandit_sync`).

May import `routers` (the policies themselves), `upstream` (which targets have a usable worker), `store`,
`telemetry`, `config`, `errors`, `outcome` and `tasks`; never `quota` or anything above it.
"""
