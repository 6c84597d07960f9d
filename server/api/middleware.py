"""A pure ASGI middleware that gives every request an id and every response the `x-turnout-request-id` header,
and the same id as `x-request-id`, which the OpenAI and Anthropic SDKs expose as a response's request id (pure
ASGI rather than Starlette's BaseHTTPMiddleware, which costs a task per request)."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-turnout-request-id"
SDK_REQUEST_ID_HEADER = b"x-request-id"


class RequestIdMiddleware:
    """Sets `request.state.request_id` and adds the header to responses that lack it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                names = {k.lower() for k, _ in headers}
                own = next((v for k, v in headers if k.lower() == REQUEST_ID_HEADER), rid.encode())
                added = [(h, own) for h in (REQUEST_ID_HEADER, SDK_REQUEST_ID_HEADER) if h not in names]
                if added:
                    message = {**message, "headers": headers + added}
            await send(message)

        await self.app(scope, receive, send_with_id)
