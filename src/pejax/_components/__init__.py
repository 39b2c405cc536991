"""Built-in components of :mod:`pejax.registry`, one module per registry (private: use the registry)."""
