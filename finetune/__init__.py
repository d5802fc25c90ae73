"""Mimics: the attacker's finetuning scripts and editors. Each class is a :class:`harness.protocols.Mimic`."""
