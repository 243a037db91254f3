"""Files in and out: images and label maps (:mod:`~fmreg.io.images`), displacement fields
(:mod:`~fmreg.io.fields`), cases and manifests (:mod:`~fmreg.io.manifest`), atomic outputs and
JSON (:mod:`~fmreg.io.outputs`), path helpers (:mod:`~fmreg.io.paths`)."""
