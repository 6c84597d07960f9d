"""The offline half of the routing library: routing tables (`dataset`, `prices`, `splits`), training
(`training`), evaluation and its metrics (`evaluation`, `report`), replaying a bandit over a table (`replay`),
and the `turnout train` / `turnout eval` commands (`commands`).

May import the rest of `routers` and the training stack (scikit-learn, pandas, pyarrow, matplotlib); never
`server`. Nothing outside it imports it, so the gateway never loads the training stack.
"""
