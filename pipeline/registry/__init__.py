"""The registry room: MLflow tracking and the Model Registry.

Holds: tracking plumbing and the store's errors (``tracking``), the champion: its alias, current
version, the paired promotion decision, and captioning with it in a process of its own
(``champion``), and the pyfunc model that downstream apps load (``pyfunc_model``, with its
models-from-code entry point ``pyfunc_model_code``).

May import: ``pipeline.captioning``, ``pipeline.data`` and the ground floor.
"""
