"""netlab's time: SNTPv4, RFC 868 and the lessons' text time on one UDP port.

The wire formats (:mod:`.proto`, no I/O), the service (:mod:`.service`), its
worker processes (:mod:`.worker`) and ``netlab time`` (:mod:`.cli`); the
requests and replies are documented in ``docs/time.rst``.
"""
