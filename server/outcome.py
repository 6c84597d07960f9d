"""`Outcome`: how a request, or one exchange with a worker, ended. A leaf: it imports nothing of the gateway.

Its value is the bounded `status` label of `turnout_requests_total`, the `reason` of
`turnout_upstream_errors_total` and the `status` field of the request log, so the values are a public
interface: dashboards and alert rules match on them. What each outcome means for the worker (a failure its
breaker and `turnout_upstream_errors_total` hear, or no error at all) and for the request (send it on to a
fallback, or retry the same model) is decided here once, and read everywhere else.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """How a request or an exchange with a worker ended."""

    OK = "ok"
    #: The gateway refused the client's request (4xx: invalid, unauthorised, over a limit, not found).
    CLIENT_ERROR = "client_error"
    #: The worker refused the request as the client's mistake (its own 4xx, relayed).
    WORKER_CLIENT_ERROR = "worker_client_error"
    #: The client went away before the answer was complete.
    CLIENT_DISCONNECT = "client_disconnect"
    #: A stream broke after it had started (cut, silent past its idle timeout, an error event from the worker).
    STREAM_ERROR = "stream_error"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"  # the worker answered 5xx, or ended a stream before its first event
    UPSTREAM_BAD_RESPONSE = "upstream_bad_response"  # a body that is not JSON
    UPSTREAM_AUTH_FAILED = "upstream_auth_failed"  # the worker refused the gateway's own credentials
    UPSTREAM_STREAM_ERROR = "upstream_stream_error"
    #: The worker's line in this gateway (`max_concurrency`, `max_queue`) had no place: nothing was sent to it.
    WORKER_OVERLOADED = "worker_overloaded"
    NO_HEALTHY_WORKER = "no_healthy_worker"
    GATEWAY_BUSY = "gateway_busy"  # this gateway's own connection pool to the workers was full
    STATE_UNAVAILABLE = "state_unavailable"
    INTERNAL_ERROR = "internal_error"
    ERROR = "error"  # any other server-side error code

    @classmethod
    def of_code(cls, code: object) -> Outcome:
        """The outcome an error code names (`ERROR` for a code that names none)."""
        try:
            return cls(str(code))
        except ValueError:
            return cls.ERROR

    @property
    def is_error(self) -> bool:
        """Whether it counts as an error on the dashboards, the status page and the alert rules: neither a
        success nor the client's own doing (its invalid request, the worker's 4xx to it, its leaving)."""
        return self not in _NOT_ERRORS

    @property
    def sends_on(self) -> bool:
        """A failure before anything reached the client after which the request goes on: to the same model
        again (see `retries_same_model`) or to the policy's next candidate."""
        return self in _SENDS_ON

    @property
    def retries_same_model(self) -> bool:
        """Worth retrying on the same model (a worker that timed out or is at capacity would be so again)."""
        return self in (Outcome.UPSTREAM_UNREACHABLE, Outcome.UPSTREAM_ERROR)

    @property
    def reached_worker(self) -> bool:
        """Whether a failure of this kind happened in an exchange with the worker: the gateway's own line
        refusing a request sent nothing, so it is no failed exchange and a send after it is no re-send."""
        return self is not Outcome.WORKER_OVERLOADED

    @property
    def unmetered(self) -> bool:
        """After this outcome the worker may have generated tokens it did not report (no usage came back)."""
        return self in (Outcome.OK, Outcome.STREAM_ERROR, Outcome.CLIENT_DISCONNECT)


_NOT_ERRORS = frozenset({Outcome.OK, Outcome.CLIENT_ERROR, Outcome.WORKER_CLIENT_ERROR, Outcome.CLIENT_DISCONNECT})
_SENDS_ON = frozenset({Outcome.UPSTREAM_UNREACHABLE, Outcome.UPSTREAM_TIMEOUT, Outcome.UPSTREAM_ERROR,
                       Outcome.WORKER_OVERLOADED, Outcome.NO_HEALTHY_WORKER})
