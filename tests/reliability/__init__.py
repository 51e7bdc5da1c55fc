"""The reliability and security suite: faults, crashes, hostile input, load, graceful stop.

Every test runs in two sizes: ``short`` in the normal CI run, and ``long`` (marked
``reliability``) under ``nox -s reliability``. Each reports its figures; they are
collected into a "reliability figures" section at the end of the pytest run.
"""
