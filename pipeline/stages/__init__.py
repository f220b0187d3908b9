"""The six DVC stages, one module each: ``run(settings)`` plus a thin ``main()``."""
