"""Studies: many training runs described by one file, launched as TorchX jobs, read back as one
report (DESIGN 8).

spec (study file + validation) -> grid (cells) -> workdir (the study's output directory) ->
datacache (each distinct prepare config once) -> runner (cells as TorchX jobs, progress) ->
common (every trained cell scored on one evaluation set) -> results (cells' records, mean +- std
over seeds) -> significance (paired Δ, t-test / DeLong) -> report (Markdown beside paper.py's
numbers, plots). `command` is `mdaf study run|report`.
"""
