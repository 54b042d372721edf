"""The public API: lrpipe on your own model and data (``lrpipe.find_lr``, ``lrpipe.choose_lr``).

``inputs`` checks what you pass and turns your data into batches; ``evaluation`` makes your
model a member of the engine's one loop, evaluated with your loss; ``find`` is the range test
over seeds; ``choose`` the whole search; ``track`` logs either through ``lrpipe.tracking``.
"""
