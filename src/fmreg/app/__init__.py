"""The commands behind the CLI, one module each; they take paths and plain values and write files.

* :mod:`~fmreg.app.register`: one pair, end to end (``register_into`` is shared by ``bench`` and ``demo``).
* :mod:`~fmreg.app.warp`, :mod:`~fmreg.app.jacobian`, :mod:`~fmreg.app.evaluate`: apply, inspect
  and score a field already on disk.
* :mod:`~fmreg.app.bench`: every pair of a manifest with each method, tabulated.
* :mod:`~fmreg.app.demo`: the built-in phantoms.
* :mod:`~fmreg.app.methods`: ``fmreg methods``, the methods and their declared parameters.
* :mod:`~fmreg.app.profiling`: peak memory; :mod:`~fmreg.app.common`: default method, progress
  lines, method parameters.
"""
