"""dicomnode analyzers: one sub-package per published method, plus the contract in ``base``."""
