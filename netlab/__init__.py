"""netlab: one Twisted daemon for file transfer, remote commands, time and chat."""

__version__ = "0.1.0"
