"""Attention kinds: what a certified site can be rewritten *to*.

One adapter file per kind (``softmax``, ``sigmoid``, ``linear``, ``summary``, ``hashed``) says
which specs it can honour (and why not), how to emit its operator from the canonical call,
which options it takes, and which per-site state it needs.  Kinds are looked up by name
(``to="softmax"``) in :mod:`attnrewrite.kinds.registry`.
"""

from attnrewrite.kinds.registry import Kind, get, names, register

__all__ = ["Kind", "get", "names", "register"]
