"""Graph passes of fqt_compile, installed as ``fqt_compile.passes``.

A pass is a function ``(gm, cfg) -> result`` that mutates ``gm`` in place, lints and recompiles
it, and records each decision it made in ``node.meta["fqt"]`` for the inspection report.
"""
