"""The attacker's purifiers, one file per method. Each class is a :class:`harness.protocols.Purifier`."""
