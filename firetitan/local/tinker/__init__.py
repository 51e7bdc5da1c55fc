"""The tinker dialect of the local trainer: what tinker 0.38 sends and expects beyond
the Fireworks contract.

* `dialect`: which of the two client populations sent a request, and the encoding its
  polls want back.
* `wire`: tinker's protobuf ``forward_backward`` bodies (sans-IO).
* `compat`: the remaining pure helpers (``tinker://`` paths, sampler lookups, options
  the trainer refuses).
"""
