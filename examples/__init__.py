"""Small user projects that use lrpipe's public API (``lrpipe.find_lr``, ``lrpipe.choose_lr``).

Each module has a ``build(seed)`` model factory, a ``load()`` data loader and a ``main()``
that prints the answer: ``python -m examples.digits_cnn`` from the repository root.
"""
