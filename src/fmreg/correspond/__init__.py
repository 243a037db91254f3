"""ROI correspondences between two images (paper 002, Eq. 5-9, Alg. 1).

:mod:`.prototypes` pools features under each ROI, :mod:`.matching` compares and pairs
prototypes, :mod:`.pairs` runs both over the slices of two images and returns ``RoiPair``s.
"""
