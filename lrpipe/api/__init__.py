"""The public API: lrpipe on your own model and data (``lrpipe.find_lr``, ``lrpipe.choose_lr``,
``lrpipe.sweep``).

``inputs`` checks what you pass and turns your data into batches; ``evaluation`` makes your
model a member of the engine's one loop, evaluated with your loss; ``find`` is the range test
over seeds; ``choose`` the whole search; ``sweep`` the grid of trainings, one MLflow child run
each; ``track`` logs them through ``lrpipe.tracking``.
"""
