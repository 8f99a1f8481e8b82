"""The analyses of the five studies (layer 6): operators, models and data -> result objects.

Each analysis returns a dataclass with ``to_dict()`` / ``to_json(path)`` and has plot helpers
beside it (``plot_*`` functions in the same module, matplotlib, returning a Figure).
"""
