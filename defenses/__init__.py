"""Protections to audit, one file per family. Each class is a :class:`harness.protocols.Defense`."""
