"""Routing for the user's own fleet: collect answers from its workers on the user's prompts (or the bundled
suite), grade them into a routing table that `turnout train` and `turnout eval` read.

Holds the prompt sources (`sources`), the run directory (`run`), one call through the gateway's own upstream
stack (`caller`), the collection engine (`collect`), grading (`grade`, `judge`), replay on logged traffic
(`replay`), promotion into a config (`promote`) and the commands (`commands`). May import `snapshot` (to check a
config), `policy`, `quota` (the prompt-token bound), `upstream`, `telemetry`, `config`, `errors`, `outcome` and
`routers`; never `gateway`, `api` or `app`.
"""
