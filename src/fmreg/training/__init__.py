"""Training of learned registration networks: synthetic data and the training loop.

:mod:`fmreg.training.synthetic` generates SynthMorph-style training pairs (random smooth label
maps, random intensities per label, smooth random diffeomorphic deformations, bias field,
noise, blur, flips/permutations and a small random affine), seeded and resumable; it is the
main training source, so that learned models never see evaluation data. The training loop
behind ``fmreg train`` (checkpoints, resume, optimizers, validation) lives beside it.
"""
