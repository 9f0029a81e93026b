"""Built-in synthetic data with known ground truth: chest phantoms and karyotypes."""
