"""dicomnode analyzers: one sub-package per published method, each laid out alike; they import the core's contract (``dicomnode.analysis``)."""
