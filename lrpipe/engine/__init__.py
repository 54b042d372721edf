"""The engine: config, data, models, optimizers (and per-weight gains), schedules, and the one
training loop (``loop.fit``; ``loop.sweep`` for the range test) over K >= 1 members
(``members.OneModel`` or ``members.Stacked``). ``train`` (one run), ``batched`` (K stacked runs)
and ``many`` (the declared batching policy) are its entry points."""
