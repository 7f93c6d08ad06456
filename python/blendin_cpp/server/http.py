"""The HTTP connections' timeouts. uvicorn 0.55 times out only a kept-alive connection that stays
idle after a response (`timeout_keep_alive`, reset by any byte that arrives) and bounds a request
head's size (`h11_max_incomplete_event_size`, 16 KiB); a client that connects and sends nothing,
or sends its head or body a byte at a time, holds its connection for ever. Here a request's head
and body must arrive within `timeout_request` seconds of the connection (or of the previous
response on it); a client that is slower is disconnected. Once the request has arrived, its
generation takes as long as it takes."""
from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    timeout_request: float = 30.0
    _request_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same time

    def connection_lost(self, exc) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer = self.loop.call_later(self.timeout_request, self._timed_out)

    def _timed_out(self) -> None:
        self._request_timer = None
        # still waiting for a request's head (IDLE) or the rest of its body (SEND_BODY)
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.logger.info("%s:%d - a request that did not arrive within %g s: disconnected",
                             *(self.client or ("?", 0)), self.timeout_request)
            self.transport.close()


def protocol(timeout_request: float) -> type[TimedH11Protocol]:
    """The protocol class for uvicorn's `http=` with this timeout."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"timeout_request": float(timeout_request)})
