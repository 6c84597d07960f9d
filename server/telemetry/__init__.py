"""What the gateway reports: the request's record (`record`), the recorder that turns it into metrics, the
status page and a log line (`recorder`), metric definitions (`metrics`), scrape-time gauges (`collectors`),
status-page totals (`status`) and the plain readings of workers and policies they read (`readings`).

May import `config`, `errors` and `outcome` only: the parts it reports on hand it `readings`, so it never
imports them.
"""
