"""Small real PyTorch models used as paramctl module-path sources and checkpoint fixtures."""
