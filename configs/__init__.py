"""Shipped configuration files (installed as ``lens_fast.configs``): training recipes (YAML) and the
released architectures' sizes (``architectures/*.json``), readable with ``importlib.resources``."""
