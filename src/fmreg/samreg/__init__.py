"""SAMReg: training-free registration from matched regions of interest (paper 002)."""
