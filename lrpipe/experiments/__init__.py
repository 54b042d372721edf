"""Experiment design as pure functions: decay schedules compared (``decay``), pretrain then
fine-tune (``transfer``), optimizers on real data (``optimizers``) and on 2-D surfaces
(``surfaces``)."""
