"""Side-by-side benchmarks of the firetitan SDK against its peers; run ``python -m benchmarks``.

See ``benchmarks/README.md`` for what each figure measures and how to read the table.
"""
