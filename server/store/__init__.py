"""State shared by gateway replicas: the `Store` protocol (`base`), the in-process store (`memory`), the
Redis store (`redis_store`), the outage guard every use goes through (`guard`) and the configured store
(`factory`).

May import `config`, `errors` and `outcome` only.
"""
