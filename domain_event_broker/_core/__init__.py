"""The floor: values and checks that every other part builds on.

Owns the root of the exception tree (``exceptions``), the boundary checks of
everything a user passes in (``validate``), the AMQP headers this library
owns (``headers``), topic matching (``topic``) and graceful stop on signals
(``signals``).

May import: the standard library only. Nothing of the package imports
upwards into it from here.
"""
