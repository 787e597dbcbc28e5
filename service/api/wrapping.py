"""Interceptors that wrap a method's handler once and reuse the wrapper.

gRPC asks each interceptor for a handler on every call. Building new wrapper
functions and handler objects each time costs a measurable part of a cheap
RPC; the handler the rest of the chain returns is the same object call after
call, so its wrapper is kept and reused for as long as it stays the same (an
interceptor further in that answers per call, such as authentication, still
runs on every call, and a new handler from it is wrapped anew).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc


class WrappingInterceptor(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self._wrappers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrappers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapper = self.wrap(handler, method)
        self._wrappers[method] = (handler, wrapper)
        return wrapper

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler that runs `handler` with this interceptor's work around it."""
        raise NotImplementedError
