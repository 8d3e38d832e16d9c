"""Tools on top of the library: the ``autopar`` command line (``cli``), the demo (``python -m
autopar.tools.demo``), plan reports, ``show --explain`` and memory sweeps. Nothing in the library imports them.
"""
