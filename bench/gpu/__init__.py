"""The prepared GPU scripts (``run_all.sh``, ``attention.sh``, ``suite.sh``) and the Python
tools they call as ``python3 -m sdiff.bench.gpu.<tool>`` from the repository root (the source
tree imports as installed: no install or copy needed on a bare GPU image). Not part of the
installed package. May import the core library, ``sdiff.util`` and ``sdiff.bench``.
"""
