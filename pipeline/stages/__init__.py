"""The DVC stages, one module each: ``run(settings)`` (a pure core plus file I/O) and a thin
``main()``. Stages talk only through the files declared in dvc.yaml, never by importing each
other (tests/test_dvc_yaml.py checks it); they may import every room below them.
"""
