"""netlab's file service: list, get and put files, verified, atomic and sandboxed.

Paths beneath the root (:mod:`.paths`), the storage (:mod:`.store`), the
service (:mod:`.service`), the client side of transfers (:mod:`.client`,
:mod:`.localdigest`) and the ``netlab ls|stat|get|put|rm|mkdir`` commands
(:mod:`.cli`); the messages are documented in ``docs/protocol.rst``.
"""
