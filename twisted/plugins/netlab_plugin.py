"""Twisted plugin: makes ``twistd netlab`` available."""

from twisted.application.service import ServiceMaker

netlab = ServiceMaker(
    "netlab", "netlab.tap", "netlab network services (file, command, time, chat)", "netlab"
)
