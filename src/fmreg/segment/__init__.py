"""Segment everything in a slice and describe it densely (paper 002, Eq. 3-4).

:mod:`.base` holds the ``Segmenter`` / ``Encoder`` protocols and ``RoiProposals``;
:mod:`.filtering` the paper's ROI filter and its constants; :mod:`.classical` and
:mod:`.segment_anything` the two backends.
"""
