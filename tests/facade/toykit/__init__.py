"""A toy async core that follows the async-core <-> facade contract, for facade tests.

`toykit._async` is hand-written in the shape of `firetitan._async`; the tests generate
its blocking facade with `scripts/gen_sync.py` into a temporary package.
"""
