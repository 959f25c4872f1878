"""mailrec: a declarative reconciler that migrates mail from on-prem Postfix to a rental service.

Flow: model (desired state) -> observe (drivers fill a World) -> diff (steps) -> safety
(invariants) -> plan (safe order, gates) -> apply (executor + journal) -> render.
"""

__version__ = "0.1.0"
