"""Benchmarks: offline engine, TorchServe serving, Triton kernels, and llama.cpp as a peer.

``workload`` draws the seeded requests every benchmark shares, ``metrics`` turns timestamps
into the reported numbers; each other module is one benchmark (runnable as a script) or the
peer it drives. Nothing in ``engine``, ``kernels`` or ``handlers`` imports from here.
"""
