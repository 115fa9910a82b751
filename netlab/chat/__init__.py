"""netlab's chat: a UDP room service (:mod:`.server`, :mod:`.service`) and its client.

The wire is documented message by message in ``docs/chat.rst``.
"""
