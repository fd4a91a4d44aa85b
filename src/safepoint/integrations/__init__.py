"""Integrations with training frameworks, one module per framework, built on safepoint's public API only.

Each module imports its framework when it is imported, never here: ``import safepoint.integrations.<name>``
without the framework installed raises an ImportError naming ``pip install 'safepoint[<name>]'``.
"""
