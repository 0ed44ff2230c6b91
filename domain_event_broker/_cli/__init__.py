"""The ``domain-event-broker`` command line, for operators.

Owns the parser and the commands (``main``), argument types shared by every
command (``arguments``) and the interactive replay prompt (``prompt``).
:mod:`domain_event_broker.cli` is its public face (``main``).

May import: every subsystem (it is the top of the package, beside ``django``).
"""
