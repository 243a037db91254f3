"""Models shipped with fmreg (weights + model.json cards)."""
